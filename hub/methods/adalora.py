"""AdaLoRA in the form PEFT saves it: per module ``lora_A`` [r, in], ``lora_E`` [r, 1], ``lora_B`` [out, r].

PEFT 0.21.2 (tuners/adalora/layer.py): ``Δ(x) = B ((A ⊙ E) x) · α / (ranknum + 1e-5)`` where ``ranknum`` is not
saved: it is the config's ``init_r`` for every module, also after the rank budget pruned some (their tensors are
saved already cut to the kept ranks, listed as boolean masks in ``rank_pattern``). With ``lora_alpha <= 0`` the
numerator is the module's rank instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hub.errors import InvalidArtifact
from hub.formats import Adapter
from hub.methods._site import SiteMethod
from hub.methods.base import PEFT_DEFAULT_ALPHA, PEFT_DEFAULT_R, Need, Term, linear_need
from hub.methods.config import Bool, Int, Number, Object
from hub.sites import (
    BaseView,
    LowRankDelta,
    expect_linear,
    expect_shape,
    parameter,
    resolve_targets,
    site_device,
)


class AdaLoraDelta(LowRankDelta):
    def __init__(self, a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, alpha: float, ranknum: float, dropout: float):
        super().__init__()
        self.lora_A = parameter(a)
        self.lora_E = parameter(e)
        self.lora_B = parameter(b)
        self.alpha = alpha
        self.ranknum = torch.tensor(ranknum, dtype=self.lora_A.dtype) + 1e-5
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.lora_A * self.lora_E, self.lora_B * (self.alpha / self.ranknum), None

    def forward(self, x: torch.Tensor, base: BaseView | None = None) -> torch.Tensor:
        if self.dropout_active:
            x = self.dropout(x)
        # PEFT's operations in PEFT's order, so the rounding matches it as well.
        return (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.alpha / self.ranknum.to(x.device)


def _kept_rank(rank_pattern: dict[str, Any] | None, path: str) -> int | None:
    """The rank PEFT's pruning kept for ``path`` (its mask's count of True), if the pattern lists it."""
    for key, mask in (rank_pattern or {}).items():
        module = key.rsplit(".", 1)[0] if key.rsplit(".", 1)[-1].startswith("lora_") else key
        if isinstance(mask, list) and (module == path or module.endswith("." + path)):
            return sum(bool(m) for m in mask)
    return None


def build(model: nn.Module, adapter: Adapter) -> dict[str, AdaLoraDelta]:
    config = adapter.config
    init_r = config.get("init_r")
    if not isinstance(init_r, int) or init_r <= 0:
        raise InvalidArtifact(f"AdaLoRA config has no valid init_r ({init_r!r})")
    alpha = float(config.get("lora_alpha", 8))
    dropout = float(config.get("lora_dropout") or 0.0)
    deltas: dict[str, AdaLoraDelta] = {}
    for target in resolve_targets(model, adapter):
        path, params = target.path, target.params
        in_features, out_features = expect_linear(target, "AdaLoRA")
        missing = [n for n in ("lora_A", "lora_E", "lora_B") if n not in params]
        if missing:
            raise InvalidArtifact(f"AdaLoRA module {path} lacks {', '.join(missing)}")
        a, e, b = params["lora_A"], params["lora_E"], params["lora_B"]
        rank = int(a.shape[0]) if a.dim() == 2 else -1
        expect_shape(path, "lora_A", a, (rank, in_features))
        expect_shape(path, "lora_E", e, (rank, 1))
        expect_shape(path, "lora_B", b, (out_features, rank))
        kept = _kept_rank(config.get("rank_pattern"), path)
        if rank > init_r or (kept is not None and kept != rank):
            raise InvalidArtifact(
                f"AdaLoRA module {path}: tensors have rank {rank} but the config allows"
                f" {kept if kept is not None else init_r}"
            )
        if rank == 0:
            continue  # the budget pruned every rank of this module: it adds nothing
        numerator = alpha if alpha > 0 else float(rank)
        device = site_device(target.module)
        deltas[path] = AdaLoraDelta(a.to(device), e.to(device), b.to(device), numerator, float(init_r), dropout)
    return deltas


def module_rank(config: Mapping[str, Any], path: str) -> int | None:
    """An AdaLoRA module's rank: ``init_r``, or once the budget is allocated, how many singular values its
    ``rank_pattern`` mask keeps (PEFT saves the tensors cut to that many)."""
    kept = _kept_rank(config.get("rank_pattern"), path)
    return kept if kept is not None else config.get("init_r", config.get("r"))


class AdaLora(SiteMethod):
    """PEFT's ADALORA type, in the pruned form PEFT saves (module docstring)."""

    peft_type = "ADALORA"
    name = "adalora"
    params = ("lora_A", "lora_B", "lora_E", "ranknum")
    fields = {"init_r": Int(1), "target_r": Int(0), "r": Int(0), "lora_alpha": Number(), "lora_dropout": Number(),
              "total_step": Int(0), "rank_pattern": Object(), "fan_in_fan_out": Bool()}
    summable = True
    low_rank = True
    mixture_expert = True
    notes = "attached in its saved (pruned) form; not trained here (its rank budget needs PEFT's allocator)"

    def rank(self, config: Mapping[str, Any], modules: Mapping[str, Any]) -> int | None:
        ranks = [module_rank(config, path) for path in modules] or [config.get("init_r", config.get("r"))]
        ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
        return max(ranks) if ranks else None

    def alpha(self, config: Mapping[str, Any]) -> float | None:
        alpha = config.get("lora_alpha")
        return alpha if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        for path, params in self.require_modules(tensors).items():
            missing = sorted({"lora_A", "lora_B", "lora_E"} - set(params))
            if missing:
                raise InvalidArtifact(f"module {path} lacks adalora tensors {', '.join(missing)}")
            a, b, e = params["lora_A"], params["lora_B"], params["lora_E"]
            if a.dim() != 2 or b.dim() != 2 or not a.shape[0] == b.shape[1] == e.shape[0]:
                raise InvalidArtifact(f"module {path}: lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)} and lora_B "
                                      f"{tuple(b.shape)} do not chain")
            rank = module_rank(config, path)
            if rank is not None and a.shape[0] != rank:
                raise InvalidArtifact(f"module {path}: tensors have rank {a.shape[0]} but the config says {rank}")

    def needs(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[Need]:
        needs = super().needs(config, shapes)
        for path, params in self.modules(shapes).items():
            if "lora_A" in params and "lora_B" in params:
                needs.append(linear_need(path, params["lora_A"][-1], params["lora_B"][0],
                                         bool(config.get("fan_in_fan_out"))))
        return needs

    def build(self, model: nn.Module, adapter: Adapter) -> dict[str, AdaLoraDelta]:
        return build(model, adapter)

    def merge_terms(self, adapter: Adapter, work: torch.dtype) -> dict[str, Term]:
        # PEFT's AdaLoRA scales by alpha / (ranknum + 1e-5) with ranknum = init_r for every module, even after the
        # budget cut a module's tensors to fewer ranks (and by the module's rank when lora_alpha <= 0).
        alpha = float(adapter.config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
        init_r = adapter.config.get("init_r", adapter.config.get("r")) or PEFT_DEFAULT_R
        terms = {}
        for path, params in adapter.modules().items():
            a, e, b = (params[name].to(work) for name in ("lora_A", "lora_E", "lora_B"))
            if a.shape[0] == 0:
                continue  # the budget pruned every rank of this module
            scale = (alpha if alpha > 0 else a.shape[0]) / (init_r + 1e-5)
            terms[path] = Term(b=b, a=(a * e) * scale, bias=None, embedding=False)
        return terms


METHOD = AdaLora()
