"""P-tuning: a soft prompt produced by an MLP/LSTM encoder during training.

PEFT bakes the encoder's output into ``prompt_embeddings`` [num_virtual_tokens, hidden] when it saves, so at
inference P-tuning is prompt tuning with those embeddings; see ``_virtual_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from hub.formats import Adapter
from hub.methods._virtual_tokens import VirtualTokenHandle, VirtualTokenMethod, attach_virtual_tokens, sum_prompts


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> VirtualTokenHandle:
    """Prepend ``adapter``'s (encoder-baked) virtual tokens to every input of ``model``; ``weight`` must be 1.0."""
    return attach_virtual_tokens(model, adapter, method="p_tuning", name=name, weight=weight)


class PTuning(VirtualTokenMethod):
    peft_type = "P_TUNING"
    name = "p_tuning"
    not_additive = "P-tuning prepends virtual tokens and changes no weight"
    summable = True
    notes = "the prompt PEFT baked from its encoder at save time; not trained here (its encoder is not saved)"

    def weighted_sum(self, adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
        return sum_prompts(adapters, weights)


METHOD = PTuning()
