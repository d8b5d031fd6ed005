"""LoKr (LyCORIS) as PEFT saves it for linear layers.

PEFT 0.21.2 (tuners/lokr/layer.py): ``ΔW = (w1 ⊗ w2) · α / r`` (α, r from the config or its patterns, whichever
factors are decomposed), with ``w1`` [a, c] saved whole (``lokr_w1``) or as ``lokr_w1_a @ lokr_w1_b`` and ``w2``
[b, d] likewise; ``out = a·b``, ``in = c·d``; ``Δ(x) = ΔW x`` formed per forward as PEFT does. Convolution LoKr
(``lokr_t2``) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter, pattern_value
from hub.formats.peft import KEY_PREFIX
from hub.methods._fresh import base_config, kaiming_uniform
from hub.methods.base import Need, Term, linear_need
from hub.methods.config import Bool, Int
from hub.methods.loha import LYCORIS_FIELDS, Lycoris
from hub.methods.lora import DEFAULT_TARGETS
from hub.sites import (
    AdditiveDelta,
    BaseView,
    expect_linear,
    linear_dims,
    parameter,
    resolve_targets,
    site_device,
    target_modules,
)


class LoKrDelta(AdditiveDelta):
    def __init__(self, tensors: dict[str, torch.Tensor], scale: float):
        super().__init__()
        for key, tensor in tensors.items():
            setattr(self, key, parameter(tensor))
        self.scale = scale

    def _factor(self, which: str) -> torch.Tensor:
        whole = getattr(self, f"lokr_{which}", None)
        if whole is not None:
            return whole
        return getattr(self, f"lokr_{which}_a") @ getattr(self, f"lokr_{which}_b")

    def forward(self, x: torch.Tensor, base: BaseView | None = None) -> torch.Tensor:
        # The dense ΔW, as PEFT forms it: the factored product (w1 X w2ᵀ) is cheaper but rounds differently, and
        # PEFT is the reference these outputs must match.
        return F.linear(x, self.delta_weight())

    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return torch.kron(self._factor("w1"), self._factor("w2")) * self.scale


def _factor_shape(path: str, params: dict[str, torch.Tensor], which: str, rank: int) -> tuple[int, int]:
    whole = params.get(f"lokr_{which}")
    if whole is not None:
        if whole.dim() != 2:
            raise InvalidArtifact(f"LoKr module {path}: lokr_{which} has shape {tuple(whole.shape)}, not 2-D")
        return int(whole.shape[0]), int(whole.shape[1])
    a, b = params.get(f"lokr_{which}_a"), params.get(f"lokr_{which}_b")
    if a is None or b is None:
        raise InvalidArtifact(f"LoKr module {path} has neither lokr_{which} nor both lokr_{which}_a/_b")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise InvalidArtifact(
            f"LoKr module {path}: lokr_{which}_a {tuple(a.shape)} and lokr_{which}_b {tuple(b.shape)} do not chain"
        )
    if a.shape[1] != rank:
        raise InvalidArtifact(f"LoKr module {path}: lokr_{which} factors have rank {a.shape[1]} but r={rank}")
    return int(a.shape[0]), int(b.shape[1])


def build(model: nn.Module, adapter: Adapter) -> dict[str, LoKrDelta]:
    config = adapter.config
    deltas: dict[str, LoKrDelta] = {}
    for target in resolve_targets(model, adapter):
        path, params = target.path, target.params
        if "lokr_t2" in params:
            raise Incompatible(f"LoKr module {path} uses the convolution (CP) form, which the hub runtime does not run")
        in_features, out_features = expect_linear(target, "LoKr")
        rank = int(pattern_value(config.get("rank_pattern"), path, config.get("r", 8)))
        a, c = _factor_shape(path, params, "w1", rank)
        b, d = _factor_shape(path, params, "w2", rank)
        if (a * b, c * d) != (out_features, in_features):
            raise Incompatible(
                f"module {path}: LoKr factors [{a}, {c}] ⊗ [{b}, {d}] make a [{a * b}, {c * d}] update but the"
                f" model's layer is [{out_features}, {in_features}]"
            )
        alpha = float(pattern_value(config.get("alpha_pattern"), path, config.get("alpha", 8)))
        device = site_device(target.module)
        deltas[path] = LoKrDelta({k: v.to(device) for k, v in params.items()}, alpha / rank)
    return deltas


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension as PEFT's lokr ``factorization`` picks them: ``(factor, dimension / factor)``
    when ``factor`` divides, else the pair nearest √dimension with m <= n (and m <= factor when one is given)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def new_adapter(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] | None = None,
    decompose_both: bool = False,
    decompose_factor: int = -1,
    seed: int = 0,
) -> Adapter:
    """A fresh LoKr for ``model`` with PEFT's shapes and initialization: ΔW = w1 ⊗ w2 with w1 [a, c], w2 [b, d]
    from factorizing out = a·b and in = c·d; a factor is split into a rank-r product when r is below half its
    larger side (w1 only with ``decompose_both``); w1 (or w1_a) starts at zero, the rest Kaiming-uniform."""
    if rank < 1:
        raise InvalidArtifact(f"LoKr rank must be at least 1, not {rank}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    chosen = target_modules(model, targets or DEFAULT_TARGETS, method="LoKr", all_required=targets is not None)
    for path, module in chosen.items():
        dims = linear_dims(module)
        if dims is None:
            raise Incompatible(f"LoKr target {path} is a {type(module).__name__}, not a linear layer")
        in_features, out_features = dims
        (a, b), (c, d) = factorization(out_features, decompose_factor), factorization(in_features, decompose_factor)
        prefix = f"{KEY_PREFIX}{path}"
        if decompose_both and rank < max(a, c) / 2:
            tensors[f"{prefix}.lokr_w1_a"] = torch.zeros(a, rank)
            tensors[f"{prefix}.lokr_w1_b"] = kaiming_uniform(rank, c, generator)
        else:
            tensors[f"{prefix}.lokr_w1"] = torch.zeros(a, c)
        if rank < max(b, d) / 2:
            tensors[f"{prefix}.lokr_w2_a"] = kaiming_uniform(b, rank, generator)
            tensors[f"{prefix}.lokr_w2_b"] = kaiming_uniform(rank, d, generator)
        else:
            tensors[f"{prefix}.lokr_w2"] = kaiming_uniform(b, d, generator)
    config = base_config(
        model, "LOKR", r=rank, alpha=alpha, target_modules=sorted({p.rsplit(".", 1)[-1] for p in chosen}),
        rank_dropout=0.0,
        module_dropout=0.0, decompose_both=decompose_both, decompose_factor=decompose_factor,
        use_effective_conv2d=False, rank_dropout_scale=False, init_weights=True,
    )
    return Adapter(config=config, tensors=tensors)


class LoKr(Lycoris):
    """PEFT's LOKR type at linear layers (module docstring)."""

    peft_type = "LOKR"
    name = "lokr"
    params = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    fields = {**LYCORIS_FIELDS, "decompose_both": Bool(), "decompose_factor": Int(-1), "rank_dropout_scale": Bool()}
    recipes = {"lokr": {}}
    default_lr = 5e-2
    make = staticmethod(new_adapter)
    notes = "linear layers; the convolution form is stored only"

    def needs(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[Need]:
        needs = super().needs(config, shapes)
        for path, params in self.modules(shapes).items():
            sides = [_side(params, which) for which in ("w1", "w2")]
            if all(side is not None for side in sides):
                (a, c), (b, d) = sides
                needs.append(linear_need(path, c * d, a * b))
        return needs

    def build(self, model: nn.Module, adapter: Adapter) -> dict[str, LoKrDelta]:
        return build(model, adapter)

    def kronecker_factors(self, adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        def factor(params: dict[str, torch.Tensor], which: str) -> torch.Tensor:
            whole = params.get(f"lokr_{which}")
            if whole is not None:
                return whole.to(torch.float64)
            return params[f"lokr_{which}_a"].to(torch.float64) @ params[f"lokr_{which}_b"].to(torch.float64)

        return {path: (factor(params, "w1"), factor(params, "w2"), float(self.scales(adapter.config, path)))
                for path, params in adapter.modules().items()}

    def merge_terms(self, adapter: Adapter, work: torch.dtype) -> dict[str, Term]:
        terms = {}
        for path, params in adapter.modules().items():
            if "lokr_t2" in params or any(tensor.dim() != 2 for tensor in params.values()):
                raise Incompatible(f"LoKr module {path} is convolutional; only linear modules can be summed")
            params = {name: tensor.to(work) for name, tensor in params.items()}
            u1, v1 = _factor_pair(params, "lokr_w1")
            u2, v2 = _factor_pair(params, "lokr_w2")
            # Mixed-product property: kron(U1·V1, U2·V2) = kron(U1, U2)·kron(V1, V2).
            terms[path] = Term(b=torch.kron(u1, u2), a=torch.kron(v1, v2) * self.scales(adapter.config, path),
                               bias=None, embedding=False)
        return terms


def _side(params: Mapping[str, tuple[int, ...]], which: str) -> tuple[int, int] | None:
    """The [rows, cols] of factor w1 or w2 from its saved shapes (whole or as a product)."""
    whole = params.get(f"lokr_{which}")
    if whole is not None:
        return (whole[0], whole[1]) if len(whole) == 2 else None
    a, b = params.get(f"lokr_{which}_a"), params.get(f"lokr_{which}_b")
    return (a[0], b[-1]) if a is not None and b is not None and len(a) == 2 and len(b) == 2 else None


def _factor_pair(params: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name in params:
        full = params[name]
        rows, cols = full.shape
        eye = torch.eye(min(rows, cols), dtype=full.dtype)
        # A full matrix W is W·I or I·W, whichever has the smaller inner dimension.
        return (full, eye) if cols <= rows else (eye, full)
    return params[f"{name}_a"], params[f"{name}_b"]


METHOD = LoKr()
