"""Composition artifacts in the table: a stack (HUB_STACK) or a gated mixture (HUB_MIXTURE) names its members by
digest; ``hub.formats.composition`` validates them and ``hub.composition`` attaches them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hub.formats.composition import validate_composition
from hub.methods.base import Method

if TYPE_CHECKING:
    import torch


# Why a composition has no single ΔW (Method.delta_refusal), by its name.
NOT_ADDITIVE = {
    "stack": "a stack is several adapters at once: compare or export its members, or a weighted sum of them",
    "mixture": "a gated mixture weights its experts per token with a trained gate, which no single ΔW expresses: use "
               "its experts one by one, or a weighted sum of them (hub compose)",
}


class CompositionArtifact(Method):
    peft_loadable = False

    def __init__(self, peft_type: str, name: str):
        super().__init__(peft_type, name)
        self.not_additive = NOT_ADDITIVE[name]

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        validate_composition(self.name, dict(config), dict(tensors))

    def needs(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list:
        return []  # its members are checked when they are registered
