"""Composition artifacts in the table: a stack (HUB_STACK) or a gated mixture (HUB_MIXTURE) names its members by
digest; ``hub.formats.composition`` validates them and ``hub.composition`` attaches them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hub.formats.composition import validate_composition
from hub.methods.base import Method

if TYPE_CHECKING:
    import torch


class CompositionArtifact(Method):
    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        validate_composition(self.name, dict(config), dict(tensors))

    def needs(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list:
        return []  # its members are checked when they are registered
