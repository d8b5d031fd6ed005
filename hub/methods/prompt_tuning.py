"""Prompt tuning: learned soft-prompt embeddings prepended to the input embeddings.

PEFT saves them as ``prompt_embeddings`` [num_virtual_tokens, hidden]. The hub prepends them on the first forward
(and generate()'s prefill) and extends the attention mask and labels to match; see ``_virtual_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hub.errors import InvalidArtifact
from hub.formats import Adapter
from hub.methods._virtual_tokens import (
    VirtualTokenHandle,
    VirtualTokenMethod,
    attach_virtual_tokens,
    prompt_config,
    sum_prompts,
)
from hub.methods.config import Text

INITS = ("sample_vocab", "random", "text")


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> VirtualTokenHandle:
    """Prepend ``adapter``'s virtual tokens to every input of ``model``; ``weight`` must be 1.0."""
    return attach_virtual_tokens(model, adapter, method="prompt_tuning", name=name, weight=weight)


def new_adapter(
    model: nn.Module,
    *,
    num_virtual_tokens: int = 8,
    init: str = "sample_vocab",
    init_text: str | None = None,
    tokenizer: Any = None,
    seed: int = 0,
) -> Adapter:
    """A fresh soft prompt initialized as PEFT's ``prompt_tuning_init`` does: ``"sample_vocab"`` the embeddings of
    random vocabulary tokens, ``"text"`` those of ``init_text``'s tokens (repeated or cut to length; needs
    ``tokenizer``), ``"random"`` standard normal (PEFT's default, far larger than real embeddings, so it trains
    worse; hence not the default here)."""
    if init not in INITS:
        raise InvalidArtifact(f"unknown prompt tuning init {init!r} (known: {', '.join(INITS)})")
    embeddings = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)
    fields: dict[str, Any] = {"prompt_tuning_init": init.upper(), "prompt_tuning_init_text": None,
                              "tokenizer_name_or_path": None}
    if init == "random":
        prompt = torch.randn(num_virtual_tokens, embeddings.weight.shape[-1], generator=generator)
    else:
        if init == "text":
            if not init_text or tokenizer is None:
                raise InvalidArtifact("prompt tuning init 'text' needs init_text and a tokenizer")
            ids = tokenizer(init_text)["input_ids"]
            ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
            fields.update(prompt_tuning_init_text=init_text,
                          tokenizer_name_or_path=getattr(tokenizer, "name_or_path", None) or None)
        else:
            ids = torch.randint(0, embeddings.num_embeddings, (num_virtual_tokens,), generator=generator).tolist()
        with torch.no_grad():
            prompt = embeddings(torch.tensor(ids, device=embeddings.weight.device)).float().cpu()
    config = prompt_config(model, "prompt_tuning", num_virtual_tokens, **fields)
    return Adapter(config=config, tensors={"prompt_embeddings": prompt})


class PromptTuning(VirtualTokenMethod):
    peft_type = "PROMPT_TUNING"
    name = "prompt_tuning"
    not_additive = "prompt tuning prepends virtual tokens and changes no weight"
    fields = {**VirtualTokenMethod.fields, "prompt_tuning_init": Text(("RANDOM", "SAMPLE_VOCAB", "TEXT")),
              "prompt_tuning_init_text": Text()}
    summable = True
    recipes = {"prompt_tuning": {}}
    # Eight soft tokens learn the date task slowly: exact match 0.00 after 12 steps, 0.54 after 60 (at lr 0.9),
    # 1.00 after 120 (bench/bench_train_tasks.py --methods prompt_tuning).
    default_lr = 0.3
    default_steps = 120
    default_warmup = 12
    make = staticmethod(new_adapter)
    notes = "decoder-only models; weight 1 only"

    def weighted_sum(self, adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
        summed = sum_prompts(adapters, weights)
        # The embeddings are loaded from the file: a TEXT init would make PEFT fetch a tokenizer for nothing.
        summed.config.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None)
        return summed


METHOD = PromptTuning()
