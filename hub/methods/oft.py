"""OFT as PEFT (>= 0.14) saves it: per module ``oft_R.weight`` [blocks (1 if block_share), b(b−1)/2].

PEFT 0.21.2 (tuners/oft/layer.py, OFTRotationModule): each row of ``oft_R.weight`` fills the upper triangle of a
b×b skew-symmetric Q; the block rotation is its Cayley transform ``R = (I − Q)(I + Q)⁻¹``, or with
``use_cayley_neumann`` the truncated series ``I + 2Q + 2Q² + … + Q^(n−1)`` (n = ``num_cayley_neumann_terms``);
``coft`` first projects Q into an ``eps`` ball. The input is rotated block by block, ``x' = x · diag(R_1 … R_k)``,
then goes through the frozen base: OFT is the site's input transform.

Refused, because the saved tensors would be read with the wrong meaning: adapters saved before PEFT 0.14 (no
``oft_block_size``; another parameterization) and Cayley–Neumann adapters saved before PEFT 0.18 (the series
changed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter
from hub.methods._site import SiteMethod
from hub.methods.config import Bool, Int, Number
from hub.sites import (
    InputTransform,
    expect_linear,
    needs_live,
    parameter,
    resolve_targets,
    site_device,
    version_key,
)


def _version(text: object) -> tuple[int, ...]:
    numbers = []
    for part in str(text or "0").partition("@")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def skew(vectors: torch.Tensor, size: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(size, size, 1, device=vectors.device)
    matrix = vectors.new_zeros(vectors.shape[0], size, size)
    matrix[:, rows, cols] = vectors
    return matrix - matrix.transpose(-2, -1)


def cayley(q: torch.Tensor, *, neumann: bool, terms: int) -> torch.Tensor:
    """PEFT's OFTRotationModule._cayley_batch on skew-symmetric blocks ``q`` [k, b, b]."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    rotation = eye.clone()
    if terms > 1:
        rotation = rotation + 2 * q
        if terms > 2:
            power = q @ q
            rotation = rotation + 2 * power
            for _ in range(3, terms - 1):
                power = power @ q
                rotation = rotation + 2 * power
            rotation = rotation + power @ q
    return rotation


def project(vectors: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """COFT: keep each block's skew matrix within ``eps`` of zero (PEFT's _project_batch)."""
    q = skew(vectors, size)
    radius = eps / math.sqrt(q.shape[0])
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    q = torch.where(norm <= radius, q, radius * q / norm)
    rows, cols = torch.triu_indices(size, size, 1, device=vectors.device)
    return q[:, rows, cols]


class OFTRotation(InputTransform):
    file_names = {"oft_R": "oft_R.weight"}

    def __init__(
        self, weight: torch.Tensor, *, block: int, blocks: int, neumann: bool, terms: int, coft_eps: float | None
    ):
        super().__init__()
        self.oft_R = parameter(weight)
        self.block, self.blocks = block, blocks
        self.neumann, self.terms, self.coft_eps = neumann, terms, coft_eps
        self._rotation: tuple[object, torch.Tensor] | None = None

    def rotations(self) -> torch.Tensor:
        """[blocks, b, b]; cached while the parameter is unchanged and not being trained."""
        if needs_live([self.oft_R]):
            return self._compute()
        if self._rotation is None or self._rotation[0] != version_key([self.oft_R]):
            with torch.no_grad():
                rotation = self._compute()
            # Keyed after computing: COFT's projection updates the parameter in place.
            self._rotation = (version_key([self.oft_R]), rotation)
        return self._rotation[1]

    def _compute(self) -> torch.Tensor:
        vectors = self.oft_R
        if self.coft_eps is not None:
            with torch.no_grad():  # PEFT projects the parameter itself, outside the graph
                self.oft_R.copy_(project(self.oft_R, self.block, self.coft_eps))
        rotation = cayley(skew(vectors, self.block), neumann=self.neumann, terms=self.terms)
        return rotation.expand(self.blocks, -1, -1) if rotation.shape[0] == 1 else rotation

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        rotation = self.rotations()
        grid = x.to(rotation.dtype).reshape(*x.shape[:-1], self.blocks, self.block)
        return torch.einsum("...rk,rkc->...rc", grid, rotation).reshape(x.shape).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        return torch.block_diag(*self.rotations())


def build(model: nn.Module, adapter: Adapter) -> dict[str, OFTRotation]:
    config = adapter.config
    if "oft_block_size" not in config:
        raise Incompatible(
            "OFT adapter was saved before PEFT 0.14 (no oft_block_size) and uses another parameterization"
        )
    neumann = bool(config.get("use_cayley_neumann", False))
    if neumann and _version(config.get("peft_version")) < (0, 18, 0):
        raise Incompatible(
            f"OFT adapter uses the Cayley-Neumann series of PEFT {config.get('peft_version') or '< 0.18'}, which PEFT"
            " 0.18 changed; retrain it with a current PEFT"
        )
    terms = int(config.get("num_cayley_neumann_terms", 5))
    coft_eps = float(config.get("eps", 6e-5)) if config.get("coft") else None
    block_share = bool(config.get("block_share"))
    deltas: dict[str, OFTRotation] = {}
    for target in resolve_targets(model, adapter):
        path, params = target.path, target.params
        in_features, _ = expect_linear(target, "OFT")
        weight = params.get("oft_R.weight")
        if weight is None or weight.dim() != 2:
            raise Incompatible(f"OFT module {path} is not in the PEFT >= 0.14 form (oft_R.weight [blocks, n])")
        block = (1 + math.isqrt(1 + 8 * weight.shape[1])) // 2
        if block * (block - 1) // 2 != weight.shape[1] or block < 2 or in_features % block:
            raise InvalidArtifact(
                f"OFT module {path}: oft_R.weight {tuple(weight.shape)} is not a set of skew blocks for"
                f" in_features={in_features}"
            )
        blocks = in_features // block
        if weight.shape[0] != (1 if block_share else blocks):
            raise InvalidArtifact(
                f"OFT module {path}: {weight.shape[0]} rotation blocks but in_features={in_features} with block size"
                f" {block} needs {1 if block_share else blocks}"
            )
        device = site_device(target.module)
        deltas[path] = OFTRotation(
            weight.to(device), block=block, blocks=blocks, neumann=neumann, terms=terms, coft_eps=coft_eps
        )
    return deltas


class Oft(SiteMethod):
    """PEFT's OFT type (module docstring): a rotation of each module's input, on the frozen base."""

    peft_type = "OFT"
    name = "oft"
    not_additive = "OFT rotates the weights: its update multiplies, it does not add a ΔW"
    params = ("oft_R.weight", "oft_R", "oft_s")
    fields = {"r": Int(0), "oft_block_size": Int(0), "use_cayley_neumann": Bool(), "num_cayley_neumann_terms": Int(1),
              "coft": Bool(), "eps": Number(), "block_share": Bool(), "fan_in_fan_out": Bool()}
    mixture_expert = True
    notes = "PEFT >= 0.14 parameterization (Cayley-Neumann from 0.18); older files are stored only"

    def rank(self, config: Mapping[str, Any], modules: Mapping[str, Any]) -> int | None:
        rank = config.get("r") or config.get("boft_block_size")
        return rank if isinstance(rank, int) and not isinstance(rank, bool) else None

    def build(self, model: nn.Module, adapter: Adapter) -> dict[str, OFTRotation]:
        return build(model, adapter)


METHOD = Oft()
