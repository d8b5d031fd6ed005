"""P-tuning: a soft prompt produced by an MLP/LSTM encoder during training.

PEFT bakes the encoder's output into ``prompt_embeddings`` [num_virtual_tokens, hidden] when it saves, so at
inference P-tuning is prompt tuning with those embeddings; see ``_virtual_tokens``.
"""

from __future__ import annotations

from torch import nn

from hub.formats import Adapter
from hub.methods._virtual_tokens import VirtualTokenHandle, attach_virtual_tokens


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> VirtualTokenHandle:
    """Prepend ``adapter``'s (encoder-baked) virtual tokens to every input of ``model``; ``weight`` must be 1.0."""
    return attach_virtual_tokens(model, adapter, method="p_tuning", name=name, weight=weight)
