"""Prefix tuning: learned key/value prefixes in front of every attention layer's cache.

PEFT saves ``prompt_embeddings`` [num_virtual_tokens, num_layers * 2 * kv_dim]; each row holds, per layer, the
key then the value of one virtual token, split into the model's key/value heads (``kv_dim`` = key/value heads x
head size, so grouped-query models get fewer heads than they have query heads). The hub puts them in a
transformers DynamicCache before the first forward; see ``_virtual_tokens``.
"""

from __future__ import annotations

from torch import nn

from hub.formats import Adapter
from hub.methods._virtual_tokens import VirtualTokenHandle, attach_virtual_tokens


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> VirtualTokenHandle:
    """Put ``adapter``'s key/value prefixes in front of ``model``'s attention cache; ``weight`` must be 1.0."""
    return attach_virtual_tokens(model, adapter, method="prefix_tuning", name=name, weight=weight)
