"""LoHa (LyCORIS) as PEFT saves it for linear layers: ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in], same for w2.

PEFT 0.21.2 (tuners/loha/layer.py): ``ΔW = ((w1_a w1_b) ⊙ (w2_a w2_b)) · α / r`` and ``Δ(x) = ΔW x``; α and r from
``alpha_pattern`` / ``rank_pattern``. The Hadamard product has no low-rank form, so ΔW is formed per forward as PEFT
does (it is not cached: on a quantized base that would store a dense full-precision copy of every adapted layer).
Convolution LoHa (``hada_t1``/``hada_t2``) is refused.
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
from hub.methods._site import SiteMethod
from hub.methods.base import PEFT_DEFAULT_ALPHA, PEFT_DEFAULT_R, Need, Term, linear_need
from hub.methods.config import Bool, Int, Number, Pattern
from hub.methods.lora import DEFAULT_TARGETS
from hub.sites import (
    AdditiveDelta,
    BaseView,
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


def new_adapter(
    model: nn.Module, *, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] | None = None, seed: int = 0
) -> Adapter:
    """A fresh LoHa for ``model`` as PEFT initializes it: w1_a, w1_b, w2_a Kaiming-uniform, w2_b zero (a no-op)."""
    if rank < 1:
        raise InvalidArtifact(f"LoHa rank must be at least 1, not {rank}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    chosen = target_modules(model, targets or DEFAULT_TARGETS, method="LoHa", all_required=targets is not None)
    for path, module in chosen.items():
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
        model, "LOHA", r=rank, alpha=alpha, target_modules=sorted({p.rsplit(".", 1)[-1] for p in chosen}),
        rank_dropout=0.0,
        module_dropout=0.0, use_effective_conv2d=False, init_weights=True,
    )
    return Adapter(config=config, tensors=tensors)


# LoHa and LoKr factors whose first dimension is the rank, whatever the layer kind (linear or conv, effective or not).
LYCORIS_RANK_FIRST = ("hada_w1_b", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1_b", "lokr_w2_b", "lokr_t2")
LYCORIS_FIELDS = {"r": Int(1), "alpha": Number(), "rank_dropout": Number(), "module_dropout": Number(),
                  "use_effective_conv2d": Bool(), "rank_pattern": Pattern(Int(1)), "alpha_pattern": Pattern(Number())}


class Lycoris(SiteMethod):
    """What LoHa and LoKr share: r/alpha with patterns, rank-first factors, a low-rank form for sums."""

    summable = True
    low_rank = True
    mixture_expert = True

    def rank(self, config: Mapping[str, Any], modules: Mapping[str, Any]) -> int | None:
        ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
        ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
        return max(ranks) if ranks else None

    def alpha(self, config: Mapping[str, Any]) -> float | None:
        alpha = config.get("alpha")
        return alpha if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        for path, params in self.require_modules(tensors).items():
            rank = pattern_value(config.get("rank_pattern"), path, config.get("r"))
            for name in LYCORIS_RANK_FIRST:
                tensor = params.get(name)
                if tensor is not None and rank is not None and (tensor.dim() < 2 or tensor.shape[0] != rank):
                    raise InvalidArtifact(
                        f"module {path}: {name} has shape {tuple(tensor.shape)}, not rank {rank} as the config says"
                    )

    def scales(self, config: Mapping[str, Any], path: str) -> float:
        """α / r of a module, through the patterns."""
        r = pattern_value(config.get("rank_pattern"), path, config.get("r") or PEFT_DEFAULT_R)
        alpha = config.get("alpha")
        alpha = pattern_value(config.get("alpha_pattern"), path, PEFT_DEFAULT_ALPHA if alpha is None else alpha)
        return alpha / r


class LoHa(Lycoris):
    """PEFT's LOHA type at linear layers (module docstring)."""

    peft_type = "LOHA"
    name = "loha"
    params = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    fields = LYCORIS_FIELDS
    recipes = {"loha": {}}
    default_lr = 3e-2
    make = staticmethod(new_adapter)
    notes = "linear layers; the convolution (CP) form is stored only"

    def needs(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[Need]:
        needs = super().needs(config, shapes)
        for path, params in self.modules(shapes).items():
            if "hada_w1_a" in params and "hada_w1_b" in params and len(params["hada_w1_b"]) == 2:
                needs.append(linear_need(path, params["hada_w1_b"][1], params["hada_w1_a"][0]))
        return needs

    def build(self, model: nn.Module, adapter: Adapter) -> dict[str, LoHaDelta]:
        return build(model, adapter)

    def merge_terms(self, adapter: Adapter, work: torch.dtype) -> dict[str, Term]:
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        terms = {}
        for path, params in adapter.modules().items():
            if "hada_t1" in params or any(name not in params or params[name].dim() != 2 for name in names):
                raise Incompatible(f"LoHa module {path} is convolutional (CP-decomposed); only linear modules can be"
                                   " summed")
            w1a, w1b, w2a, w2b = (params[name].to(work) for name in names)
            # (w1a·w1b) ⊙ (w2a·w2b) = B·A with B[i, (p,q)] = w1a[i,p]·w2a[i,q] and A[(p,q), j] = w1b[p,j]·w2b[q,j].
            b = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
            a = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
            terms[path] = Term(b=b, a=a * self.scales(adapter.config, path), bias=None, embedding=False)
        return terms



METHOD = LoHa()
