"""Train an adapter on a (typically quantized) base, QLoRA style: the base is frozen, the adapter trains in fp32.

``train(model, tokenizer, examples, recipe)`` makes a fresh adapter of ``recipe.method`` (initialized as PEFT
initializes it, from ``recipe.seed``), attaches it with the hub runtime, trains only its tensors with AdamW on the
completion tokens (``hub.data.collate`` masks the prompts), and returns it as an ``Adapter`` in PEFT's format.
The same recipe, data and base give the same adapter, bit for bit, on the same machine and thread count.

Nothing here is CPU-specific; on this project's CPU-only machines SmolLM2-135M on nf4 learns each built-in task
with a rank-8 LoRA in about a minute.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hub.data import Encoded, Example, collate, encode_all
from hub.errors import InvalidArtifact
from hub.formats import Adapter
from hub.methods import trainer
from hub.runtime import attach, place

# Recipe fields a method's new_adapter takes when it has them.
LOW_RANK = ("rank", "alpha")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a training run; recorded with the registered version (``to_dict``).

    ``targets``: module names to adapt (None: the method's default, the attention projections for the LoRA family).
    ``method`` is a recipe name of the method table (``hub.methods.table.trainer``: ``lora``, ``dora`` = LoRA with
    use_dora, ``loha``...). ``rank``/``alpha`` apply to the low-rank methods (rank None: the method's default, which
    modules too small to hold it lower); ``options`` holds the method's other ``new_adapter`` arguments
    (``use_rslora``, ``dropout``, ``num_virtual_tokens``, ``bottleneck_size``, ``feedforward``, ...).
    ``lr``, ``steps`` and ``warmup`` None take the method's defaults (``Method.default_lr``, ``default_steps``,
    ``default_warmup``); the recorded recipe holds the values used.
    """

    method: str = "lora"
    rank: int | None = None
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    # The methods' defaults teach SmolLM2-135M-nf4 the date task (exact match >= 0.9; bench/bench_train_tasks.py),
    # LoRA's each built-in task in about a minute on one CPU core.
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup: int | None = None
    max_grad_norm: float | None = 1.0
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        method, implied = trainer(self.method)
        # Frozen: normalize through object.__setattr__ (defaults filled in, lists from JSON become tuples).
        for name, default in (("steps", method.default_steps), ("warmup", method.default_warmup),
                              ("lr", method.default_lr)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidArtifact(f"recipe {name} must be a positive integer, not {getattr(self, name)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InvalidArtifact(f"recipe warmup must be a non-negative integer, not {self.warmup!r}")
        if isinstance(self.targets, str):
            raise InvalidArtifact(f"recipe targets must be a list of module names, not the string {self.targets!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "options", dict(self.options))
        accepted = set(method.option_names()) - {"tokenizer", "seed", "steps", *LOW_RANK, "targets", *implied}
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise InvalidArtifact(
                f"unknown {self.method} option {', '.join(unknown)} (known: {', '.join(sorted(accepted)) or 'none'})"
            )
        method.check_options(self.options)
        try:
            json.dumps(self.to_dict(), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArtifact(f"recipe is not JSON-serialisable: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples as lists); ``Recipe.from_dict`` gives the recipe back."""
        data = asdict(self)
        data["targets"] = list(self.targets) if self.targets is not None else None
        data["options"] = {key: list(v) if isinstance(v, tuple) else v for key, v in sorted(self.options.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArtifact(f"unknown recipe field {', '.join(unknown)}")
        return cls(**data)


@dataclass
class TrainResult:
    adapter: Adapter
    recipe: Recipe
    losses: list[float]  # per optimizer step: mean cross-entropy over the step's completion tokens
    seconds: float = 0.0


def new_adapter(model: nn.Module, recipe: Recipe, *, tokenizer: Any = None) -> Adapter:
    """A fresh adapter of ``recipe.method`` for ``model``, initialized as PEFT does, from ``recipe.seed``."""
    method, implied = trainer(recipe.method)
    takes = set(method.option_names())
    kwargs: dict[str, Any] = {**recipe.options, **implied}
    if "seed" in takes:
        kwargs["seed"] = recipe.seed
    if "steps" in takes:  # a method that schedules over the run (AdaLoRA's total_step)
        kwargs["steps"] = recipe.steps
    if "tokenizer" in takes:
        kwargs["tokenizer"] = tokenizer
    if recipe.targets is not None:
        kwargs["targets"] = recipe.targets
    for name in LOW_RANK:
        if name in takes and getattr(recipe, name) is not None:
            kwargs[name] = getattr(recipe, name)
    return method.new_adapter(model, **kwargs)


def train(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    recipe: Recipe | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a new adapter of ``recipe.method`` on prompt/completion ``examples`` (loss on completions only).

    Each optimizer step sees ``batch_size × grad_accum`` examples (shuffled epochs, from ``recipe.seed``) and
    averages the loss over all their completion tokens, so accumulation changes memory, not the result. The model
    is left as it was: the adapter is detached afterwards and the model's train/eval mode restored (except under
    LoftQ, ``init_lora_weights="loftq"``, which rewrites the targeted base layers: ``hub.methods.loftq``).
    The method's ``training_loss`` joins each step's loss (not the recorded ``losses``) and its ``after_step`` runs
    after each optimizer step (AdaLoRA's orthogonal regularizer and rank allocator).

    ``model``: any causal LM (hub-loaded or loaded by the caller with transformers: fp32/bf16/fp16, bitsandbytes
    nf4/int8, a ``device_map`` placement). ``device``: move the model there first (None: train where it is).
    Raises InvalidArtifact (empty data), Incompatible (a model that cannot move to ``device``).
    """
    recipe = recipe or Recipe()
    if not examples:
        raise InvalidArtifact("the training set is empty")
    encoded, pad = encode_all(model, tokenizer, examples)
    device = place(model, device)
    started = time.perf_counter()
    method = trainer(recipe.method)[0]
    handle = attach(model, new_adapter(model, recipe, tokenizer=tokenizer))
    was_training = model.training
    # Dropout draws from torch's global generator: seed a private copy of it so runs repeat and callers' random
    # state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        try:
            params = handle.trainable_parameters()
            optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, recipe))
            batches = _batches(encoded, recipe.batch_size, random.Random(recipe.seed))
            losses: list[float] = []
            model.train()
            bar = tqdm(range(recipe.steps), desc=f"train {recipe.method}", unit="step", disable=not progress)
            for step in bar:
                micro = [collate(next(batches), pad_id=pad, left=True) for _ in range(recipe.grad_accum)]
                scored = sum(int((labels[:, 1:] != -100).sum()) for _, labels, _ in micro)
                step_loss = 0.0
                for ids, labels, mask in micro:
                    loss = completion_loss(model, ids.to(device), labels.to(device), mask.to(device)) / scored
                    loss.backward()
                    step_loss += loss.item()
                extra = method.training_loss(handle)
                if extra is not None:
                    extra.backward()
                if recipe.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
                optimizer.step()
                schedule.step()
                method.after_step(handle, step + 1)
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
                bar.set_postfix(loss=f"{step_loss:.3f}")
            adapter = handle.to_adapter()
        finally:
            handle.detach()
            model.train(was_training)
    return TrainResult(adapter=adapter, recipe=recipe, losses=losses, seconds=time.perf_counter() - started)


def completion_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the completion tokens of a left-padded batch.

    Only the positions that predict completion tokens go through the output head (``logits_to_keep``): on a small
    model the vocabulary projection is a fifth of the forward, and prompts are most of each sequence.
    """
    scored = labels != -100
    first = int(scored.int().argmax(dim=1).min()) if bool(scored.any()) else ids.shape[1] - 1
    keep = ids.shape[1] - max(first - 1, 0)  # from the position that predicts the earliest completion token
    # Positions counted from each row's first real token, as for an unpadded sequence (and as generate() does).
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep,
                   use_cache=False).logits
    targets = labels[:, ids.shape[1] - keep + 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


def _batches(encoded: list[Encoded], size: int, rng: random.Random) -> Iterator[list[Encoded]]:
    """Endless batches over shuffled epochs: every example once per epoch (the last batch of an epoch is filled
    from the next)."""
    pending: list[Encoded] = []
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        pending.extend(encoded[i] for i in order)
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]


def lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warmup over ``recipe.warmup`` steps, then cosine decay to zero at ``recipe.steps``."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
