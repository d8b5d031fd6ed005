"""Prompt tuning: learned soft-prompt embeddings prepended to the input embeddings.

PEFT saves them as ``prompt_embeddings`` [num_virtual_tokens, hidden]. The hub prepends them on the first forward
(and generate()'s prefill) and extends the attention mask and labels to match; see ``_virtual_tokens``.
"""

from __future__ import annotations

from torch import nn

from hub.formats import Adapter
from hub.methods._virtual_tokens import VirtualTokenHandle, attach_virtual_tokens


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> VirtualTokenHandle:
    """Prepend ``adapter``'s virtual tokens to every input of ``model``; ``weight`` must be 1.0."""
    return attach_virtual_tokens(model, adapter, method="prompt_tuning", name=name, weight=weight)
