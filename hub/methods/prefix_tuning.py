"""Prefix tuning: learned key/value prefixes in front of every attention layer's cache.

PEFT saves ``prompt_embeddings`` [num_virtual_tokens, num_layers * 2 * kv_dim]; each row holds, per layer, the
key then the value of one virtual token, split into the model's key/value heads (``kv_dim`` = key/value heads x
head size, so grouped-query models get fewer heads than they have query heads). The hub puts them in a
transformers DynamicCache before the first forward; see ``_virtual_tokens``.
"""

from __future__ import annotations

import torch
from torch import nn

from hub.formats import Adapter
from hub.methods._virtual_tokens import VirtualTokenHandle, VirtualTokenMethod, attach_virtual_tokens, prompt_config


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> VirtualTokenHandle:
    """Put ``adapter``'s key/value prefixes in front of ``model``'s attention cache; ``weight`` must be 1.0."""
    return attach_virtual_tokens(model, adapter, method="prefix_tuning", name=name, weight=weight)


def new_adapter(model: nn.Module, *, num_virtual_tokens: int = 8, seed: int = 0) -> Adapter:
    """Fresh key/value prefixes as PEFT initializes them without ``prefix_projection``: standard normal (the
    default init of its nn.Embedding)."""
    config = prompt_config(model, "prefix_tuning", num_virtual_tokens, prefix_projection=False)
    config["encoder_hidden_size"] = config["token_dim"]
    width = config["num_layers"] * 2 * config["token_dim"]
    generator = torch.Generator().manual_seed(seed)
    return Adapter(config=config, tensors={"prompt_embeddings": torch.randn(num_virtual_tokens, width,
                                                                          generator=generator)})


class PrefixTuning(VirtualTokenMethod):
    peft_type = "PREFIX_TUNING"
    name = "prefix_tuning"
    not_additive = "prefix tuning adds attention keys and values and changes no weight"
    recipes = {"prefix_tuning": {}}
    # Random-normal prefixes need many small steps: 12 reach exact match 0.00 on the date task, 80 reach 0.94
    # (bench/bench_train_tasks.py --methods prefix_tuning).
    default_lr = 1e-2
    default_steps = 80
    default_warmup = 8
    make = staticmethod(new_adapter)
    notes = "decoder-only models, without prefix_projection; weight 1 only"


METHOD = PrefixTuning()
