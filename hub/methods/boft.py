"""BOFT as PEFT saves it: per module ``boft_R`` [factors, blocks, b, b] and ``boft_s`` [out, 1].

PEFT 0.21.2 (tuners/boft/layer.py): each b×b block becomes orthogonal by the Cayley transform of its skew part,
``R = (I − S)(I + S)⁻¹`` with ``S = (B − Bᵀ)/2``; the input is rotated, ``x' = x · diag(R_1 … R_k)``, and the base
output without its bias is scaled: ``y = (base(x') − bias) ⊙ s + bias``.

Only one butterfly factor is run. Without PEFT's CUDA extension, PEFT itself builds BOFT with one factor (it sets
``boft_n_butterfly_factor`` to 1); adapters with more factors (``boft_R`` [f > 1, ...]) come from its CUDA build,
whose block-diagonal kernel cannot be checked against PEFT on a CPU, so they are refused rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter
from hub.methods._site import SiteMethod
from hub.methods.config import Bool, Int
from hub.sites import (
    InputTransform,
    OutputTransform,
    expect_linear,
    expect_shape,
    needs_live,
    parameter,
    resolve_targets,
    site_device,
    version_key,
)


class BOFTDelta(InputTransform, OutputTransform):
    """Rotates the base layer's input and scales its output (bias excluded)."""

    roles = frozenset({"input", "output"})
    scales_bias = False

    def __init__(self, blocks: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.boft_R = parameter(blocks)
        self.boft_s = parameter(scale)
        self._matrix: tuple[object, torch.Tensor] | None = None

    def matrix(self) -> torch.Tensor:
        if needs_live([self.boft_R]):
            return self._compute()
        if self._matrix is None or self._matrix[0] != version_key([self.boft_R]):
            with torch.no_grad():
                self._matrix = (version_key([self.boft_R]), self._compute())
        return self._matrix[1]

    def _compute(self) -> torch.Tensor:
        blocks = self.boft_R[0]
        skew = 0.5 * (blocks - blocks.transpose(1, 2))
        eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device).expand_as(blocks)
        return torch.block_diag(*torch.linalg.solve(eye + skew, eye - skew, left=False))

    def scale(self) -> torch.Tensor:
        return self.boft_s.flatten()


def build(model: nn.Module, adapter: Adapter) -> dict[str, BOFTDelta]:
    deltas: dict[str, BOFTDelta] = {}
    for target in resolve_targets(model, adapter):
        path, params = target.path, target.params
        in_features, out_features = expect_linear(target, "BOFT")
        blocks, scale = params.get("boft_R"), params.get("boft_s")
        if blocks is None or scale is None:
            raise InvalidArtifact(f"BOFT module {path} needs both boft_R and boft_s")
        if blocks.dim() != 4 or blocks.shape[2] != blocks.shape[3]:
            raise InvalidArtifact(f"BOFT module {path}: boft_R has shape {tuple(blocks.shape)}, not [f, k, b, b]")
        if blocks.shape[0] != 1:
            raise Incompatible(
                f"BOFT module {path} has {blocks.shape[0]} butterfly factors; the hub runs one (see hub.methods.boft)"
            )
        if blocks.shape[1] * blocks.shape[2] != in_features:
            raise Incompatible(
                f"module {path}: BOFT rotates {blocks.shape[1]}×{blocks.shape[2]} features but the layer has"
                f" in_features={in_features}"
            )
        expect_shape(path, "boft_s", scale, (out_features, 1))
        device = site_device(target.module)
        deltas[path] = BOFTDelta(blocks.to(device), scale.to(device))
    return deltas


class Boft(SiteMethod):
    """PEFT's BOFT type (module docstring): a rotation of each module's input, on the frozen base."""

    peft_type = "BOFT"
    name = "boft"
    not_additive = "BOFT rotates the weights: its update multiplies, it does not add a ΔW"
    params = ("boft_R", "boft_s")
    fields = {"boft_block_size": Int(0), "boft_block_num": Int(0), "boft_n_butterfly_factor": Int(0),
              "fan_in_fan_out": Bool()}
    mixture_expert = True
    notes = "one butterfly factor (PEFT's CPU build); more factors are stored only"

    def rank(self, config: Mapping[str, Any], modules: Mapping[str, Any]) -> int | None:
        rank = config.get("r") or config.get("boft_block_size")
        return rank if isinstance(rank, int) and not isinstance(rank, bool) else None

    def build(self, model: nn.Module, adapter: Adapter) -> dict[str, BOFTDelta]:
        return build(model, adapter)


METHOD = Boft()
