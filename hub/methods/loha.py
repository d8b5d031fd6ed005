"""LoHa (LyCORIS) as PEFT saves it for linear layers: ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in], same for w2.

PEFT 0.21.2 (tuners/loha/layer.py): ``ΔW = ((w1_a w1_b) ⊙ (w2_a w2_b)) · α / r`` and ``Δ(x) = ΔW x``; α and r from
``alpha_pattern`` / ``rank_pattern``. The Hadamard product has no low-rank form, so ΔW is formed per forward as PEFT
does (it is not cached: on a quantized base that would store a dense full-precision copy of every adapted layer).
Convolution LoHa (``hada_t1``/``hada_t2``) is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter, pattern_value
from hub.formats.peft import KEY_PREFIX
from hub.methods._fresh import base_config, kaiming_uniform
from hub.methods.lora import DEFAULT_TARGETS
from hub.runtime.layers import (
    AdditiveDelta,
    BaseView,
    SiteHandle,
    attach_deltas,
    expect_linear,
    expect_shape,
    linear_dims,
    parameter,
    resolve_targets,
    site_device,
    target_modules,
)


class LoHaDelta(AdditiveDelta):
    def __init__(self, tensors: dict[str, torch.Tensor], scale: float):
        super().__init__()
        self.hada_w1_a = parameter(tensors["hada_w1_a"])
        self.hada_w1_b = parameter(tensors["hada_w1_b"])
        self.hada_w2_a = parameter(tensors["hada_w2_a"])
        self.hada_w2_b = parameter(tensors["hada_w2_b"])
        self.scale = scale

    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale

    def forward(self, x: torch.Tensor, base: BaseView | None = None) -> torch.Tensor:
        return F.linear(x, self.delta_weight())


def build(model: nn.Module, adapter: Adapter) -> dict[str, LoHaDelta]:
    config = adapter.config
    deltas: dict[str, LoHaDelta] = {}
    for target in resolve_targets(model, adapter):
        path, params = target.path, target.params
        if "hada_t1" in params or "hada_t2" in params:
            raise Incompatible(f"LoHa module {path} uses the convolution (CP) form, which the hub runtime does not run")
        in_features, out_features = expect_linear(target, "LoHa")
        missing = [n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if n not in params]
        if missing:
            raise InvalidArtifact(f"LoHa module {path} lacks {', '.join(missing)}")
        rank = int(pattern_value(config.get("rank_pattern"), path, config.get("r", 8)))
        found = {params[f"hada_w{h}_a"].shape[-1] for h in "12"} | {params[f"hada_w{h}_b"].shape[0] for h in "12"}
        if found != {rank}:
            raise InvalidArtifact(f"LoHa module {path}: tensors have rank {sorted(found)} but the config says r={rank}")
        for half in ("1", "2"):
            expect_shape(path, f"hada_w{half}_a", params[f"hada_w{half}_a"], (out_features, rank))
            expect_shape(path, f"hada_w{half}_b", params[f"hada_w{half}_b"], (rank, in_features))
        alpha = float(pattern_value(config.get("alpha_pattern"), path, config.get("alpha", 8)))
        device = site_device(target.module)
        deltas[path] = LoHaDelta({k: v.to(device) for k, v in params.items()}, alpha / rank)
    return deltas


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> SiteHandle:
    """Attach a PEFT LoHa adapter to ``model``."""
    return attach_deltas(model, build(model, adapter), adapter=adapter, name=name, method="loha", weight=weight)


def new_adapter(
    model: nn.Module, *, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0
) -> Adapter:
    """A fresh LoHa for ``model`` as PEFT initializes it: w1_a, w1_b, w2_a Kaiming-uniform, w2_b zero (a no-op)."""
    if rank < 1:
        raise InvalidArtifact(f"LoHa rank must be at least 1, not {rank}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in target_modules(model, targets, method="LoHa").items():
        dims = linear_dims(module)
        if dims is None:
            raise Incompatible(f"LoHa target {path} is a {type(module).__name__}, not a linear layer")
        in_features, out_features = dims
        prefix = f"{KEY_PREFIX}{path}"
        tensors[f"{prefix}.hada_w1_a"] = kaiming_uniform(out_features, rank, generator)
        tensors[f"{prefix}.hada_w1_b"] = kaiming_uniform(rank, in_features, generator)
        tensors[f"{prefix}.hada_w2_a"] = kaiming_uniform(out_features, rank, generator)
        tensors[f"{prefix}.hada_w2_b"] = torch.zeros(rank, in_features)
    config = base_config(
        model, "LOHA", r=rank, alpha=alpha, target_modules=sorted(set(targets)), rank_dropout=0.0,
        module_dropout=0.0, use_effective_conv2d=False, init_weights=True,
    )
    return Adapter(config=config, tensors=tensors)
