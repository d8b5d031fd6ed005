"""Train an adapter on a (typically quantized) base, QLoRA style: the base is frozen, the adapter trains in fp32.

Nothing here is CPU-specific; on this project's CPU-only machines SmolLM2-135M on nf4 trains a LoRA in minutes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from hub.data import Example, collate, context_length, encode
from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter
from hub.runtime import attach, detach

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a training run; recorded with the registered version."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LLAMA_ATTENTION
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 10
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}


@dataclass
class TrainResult:
    adapter: Adapter
    recipe: Recipe
    losses: list[float]


def new_lora(model: torch.nn.Module, *, rank: int, alpha: float, targets: Sequence[str], seed: int) -> Adapter:
    """A fresh LoRA for ``model`` as PEFT initializes it: A Kaiming-uniform, B zero (so it starts as a no-op)."""
    if rank < 1:
        raise InvalidArtifact(f"rank must be at least 1, not {rank}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features"):
            a = torch.empty(rank, module.in_features)
            bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT use
            a.uniform_(-bound, bound, generator=generator)
            tensors[f"base_model.model.{path}.lora_A.weight"] = a
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.zeros(module.out_features, rank)
    found = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in tensors}
    missing = sorted(set(targets) - found)
    if missing:
        raise Incompatible(f"the model has no linear module named {', '.join(missing)}")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(set(targets)),
              "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False,
              "use_dora": False, "base_model_name_or_path": getattr(model, "name_or_path", None)}
    return Adapter(config=config, tensors=tensors)


def train(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    recipe: Recipe = Recipe(),
    *,
    progress: bool = True,
) -> TrainResult:
    """Train a new adapter of ``recipe.method`` on prompt/completion ``examples`` (loss on completions only)."""
    if not examples:
        raise InvalidArtifact("the training set is empty")
    limit = context_length(model)
    encoded = [encode(tokenizer, ex, max_length=limit, index=i) for i, ex in enumerate(examples)]
    torch.manual_seed(recipe.seed)
    initial = new_lora(model, rank=recipe.rank, alpha=recipe.alpha, targets=recipe.targets, seed=recipe.seed)
    handle = attach(model, initial, name="training")
    try:
        params = handle.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, recipe))
        order = random.Random(recipe.seed)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = next(model.parameters()).device
        losses: list[float] = []
        model.train()
        bar = tqdm(range(recipe.steps), desc=f"train {recipe.method}", unit="step", disable=not progress)
        for _ in bar:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(recipe.grad_accum):
                batch = [encoded[order.randrange(len(encoded))] for _ in range(recipe.batch_size)]
                ids, labels, mask = (t.to(device) for t in collate(batch, pad_id=pad))
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / recipe.grad_accum
                loss.backward()
                step_loss += loss.item()
            optimizer.step()
            schedule.step()
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}")
        model.eval()
        adapter = handle.to_adapter()
    finally:
        detach(model, handle)
    return TrainResult(adapter=adapter, recipe=recipe, losses=losses)


def _lr_factor(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

