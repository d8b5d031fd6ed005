"""AdaLoRA in the form PEFT saves it: per module ``lora_A`` [r, in], ``lora_E`` [r, 1], ``lora_B`` [out, r].

PEFT 0.21.2 (tuners/adalora/layer.py): ``Δ(x) = B ((A ⊙ E) x) · α / (ranknum + 1e-5)`` where ``ranknum`` is not
saved: it is the config's ``init_r`` for every module, also after the rank budget pruned some (their tensors are
saved already cut to the kept ranks, listed as boolean masks in ``rank_pattern``). With ``lora_alpha <= 0`` the
numerator is the module's rank instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hub.errors import InvalidArtifact
from hub.formats import Adapter
from hub.runtime.layers import (
    BaseView,
    LowRankDelta,
    SiteHandle,
    attach_deltas,
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


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> SiteHandle:
    """Attach a PEFT AdaLoRA adapter (its saved, pruned form) to ``model``."""
    return attach_deltas(model, build(model, adapter), adapter=adapter, name=name, method="adalora", weight=weight)
