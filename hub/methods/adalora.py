"""AdaLoRA in the form PEFT saves it: per module ``lora_A`` [r, in], ``lora_E`` [r, 1], ``lora_B`` [out, r].

PEFT 0.21.2 (tuners/adalora/layer.py): ``Δ(x) = B ((A ⊙ E) x) · α / (ranknum + 1e-5)`` where ``ranknum`` is not
saved: it is the config's ``init_r`` for every module, also after the rank budget pruned some (their tensors are
saved already cut to the kept ranks, listed as boolean masks in ``rank_pattern``). With ``lora_alpha <= 0`` the
numerator is the module's rank instead.

Training (AdaLoRA, Zhang et al., ICLR 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"; PEFT's
``RankAllocator`` and ``AdaLoraModel.update_and_allocate``, whose arithmetic this mirrors): the loss gains
``orth_reg_weight`` times the mean over every ``lora_A`` and ``lora_B`` of ``‖A Aᵀ − I‖_F`` / ``‖BᵀB − I‖_F``
(PEFT's form: the Frobenius norm, not its square). After each optimizer step ``t`` (counted from 1, gradients still
present): while ``t < total_step − tfinal`` every entry's sensitivity ``I = |w · ∂L/∂w|`` is smoothed,
``Ī ← β1 Ī + (1 − β1) I``, and its uncertainty ``Ū ← β2 Ū + (1 − β2) |I − Ī|``; a triplet's score is its singular
value's ``Ī Ū`` plus the means of ``Ī Ū`` over its row of ``lora_A`` and its column of ``lora_B``. The budget (total
kept ranks) is ``init_r`` per module up to ``tinit``, then falls cubically to ``target_r`` per module at
``total_step − tfinal``; every ``deltaT`` steps the singular values of the lowest-scored triplets beyond the budget
are zeroed. At ``t = total_step − tfinal`` the allocation is final (``rank_pattern``) and re-applied after every later
step; the trained adapter is saved cut to the kept triplets, as PEFT saves it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter
from hub.formats.peft import KEY_PREFIX
from hub.methods._fresh import base_config
from hub.methods._site import SiteMethod
from hub.methods.base import PEFT_DEFAULT_ALPHA, PEFT_DEFAULT_R, Need, Term, linear_need
from hub.methods.config import Bool, Int, Number, Object
from hub.methods.lora import DEFAULT_RANK, DEFAULT_TARGETS
from hub.sites import (
    BaseView,
    LowRankDelta,
    SiteHandle,
    expect_linear,
    expect_shape,
    linear_dims,
    parameter,
    resolve_targets,
    site_device,
    target_modules,
)

# The factors whose importance is scored, as PEFT names them.
SCORED = ("lora_A", "lora_E", "lora_B")


class AdaLoraDelta(LowRankDelta):
    def __init__(self, a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, alpha: float, ranknum: float, dropout: float):
        super().__init__()
        self.lora_A = parameter(a)
        self.lora_E = parameter(e)
        self.lora_B = parameter(b)
        self.alpha = alpha
        self.ranknum = torch.tensor(ranknum, dtype=self.lora_A.dtype) + 1e-5
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # Training state (``allocate``): per factor the smoothed sensitivity Ī and uncertainty Ū, then, once the
        # budget is final, the triplets kept ([r] bools; the file holds only those).
        self.importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kept: torch.Tensor | None = None

    def file_parameters(self) -> dict[str, torch.Tensor]:
        if self.kept is None:
            return super().file_parameters()
        kept = self.kept.to(self.lora_A.device)
        return {"lora_A": self.lora_A[kept], "lora_E": self.lora_E[kept], "lora_B": self.lora_B[:, kept]}

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


def new_adapter(
    model: nn.Module,
    *,
    steps: int,
    rank: int | None = None,
    init_r: int | None = None,
    alpha: float = 16.0,
    targets: Sequence[str] | None = None,
    tinit: int | None = None,
    tfinal: int | None = None,
    deltaT: int = 1,  # noqa: N803 (PEFT's name)
    beta1: float = 0.85,
    beta2: float = 0.85,
    orth_reg_weight: float = 0.5,
    dropout: float = 0.0,
    seed: int = 0,
) -> Adapter:
    """A fresh AdaLoRA for ``model`` as PEFT initializes it (``lora_A`` [init_r, in] and ``lora_B`` [out, init_r]
    normal with std 0.02, ``lora_E`` [init_r, 1] zero, so it starts as a no-op), for a run of ``steps`` optimizer
    steps (PEFT's ``total_step``).

    ``rank``: the average rank the budget ends at (PEFT's ``target_r``; None: ``DEFAULT_RANK``); ``init_r`` the rank
    every module starts with (None: 1.5 × ``rank``, PEFT's default ratio 12/8). ``tinit``/``tfinal``: steps before
    the budget starts falling and after it is final (None: a fifth of ``steps`` each). ``deltaT``, ``beta1``,
    ``beta2``, ``orth_reg_weight``: PEFT's AdaLoraConfig fields (module docstring). ``targets`` None: those of
    LoRA's defaults the model has. Raises InvalidArtifact (a schedule or value PEFT refuses), Incompatible.
    """
    check_settings(init_r=init_r, tinit=tinit, tfinal=tfinal, deltaT=deltaT, beta1=beta1, beta2=beta2,
                   orth_reg_weight=orth_reg_weight)
    rank = DEFAULT_RANK if rank is None else rank
    init_r = math.ceil(1.5 * rank) if init_r is None else init_r
    tinit = steps // 5 if tinit is None else tinit
    tfinal = steps // 5 if tfinal is None else tfinal
    if rank < 1 or init_r <= rank:
        raise InvalidArtifact(f"AdaLoRA needs 1 <= target_r < init_r (a budget to allocate), not target_r={rank},"
                              f" init_r={init_r}")
    if tinit >= steps - tfinal:
        raise InvalidArtifact(f"AdaLoRA schedule leaves no budgeting phase: tinit={tinit} must be below total_step"
                              f" - tfinal = {steps} - {tfinal}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    chosen = target_modules(model, targets or DEFAULT_TARGETS, method="AdaLoRA", all_required=targets is not None)
    for path, module in chosen.items():
        dims = linear_dims(module)
        if dims is None:
            raise Incompatible(f"AdaLoRA target {path} is a {type(module).__name__}, not a linear layer")
        in_features, out_features = dims
        prefix = f"{KEY_PREFIX}{path}"
        tensors[f"{prefix}.lora_A"] = torch.empty(init_r, in_features).normal_(0.0, 0.02, generator=generator)
        tensors[f"{prefix}.lora_E"] = torch.zeros(init_r, 1)
        tensors[f"{prefix}.lora_B"] = torch.empty(out_features, init_r).normal_(0.0, 0.02, generator=generator)
    config = base_config(
        model, "ADALORA", init_r=init_r, target_r=rank, tinit=tinit, tfinal=tfinal, deltaT=deltaT, beta1=beta1,
        beta2=beta2, orth_reg_weight=orth_reg_weight, total_step=steps, rank_pattern=None, lora_alpha=alpha,
        lora_dropout=dropout, target_modules=sorted({p.rsplit(".", 1)[-1] for p in chosen}), bias="none",
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in chosen.values()), init_lora_weights=True,
    )
    return Adapter(config=config, tensors=tensors)


def check_settings(*, init_r: int | None = None, tinit: int | None = None, tfinal: int | None = None,
                   deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,  # noqa: N803 (PEFT's name)
                   orth_reg_weight: float = 0.5) -> None:
    """Refuse settings PEFT refuses or cannot run, one line each (None: the default, decided with the run's
    steps). Raises InvalidArtifact."""
    for name, value, least in (("init_r", init_r, 1), ("tinit", tinit, 0), ("tfinal", tfinal, 0),
                               ("deltaT", deltaT, 1)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise InvalidArtifact(f"AdaLoRA {name} must be an integer of at least {least}, not {value!r}")
    if not all(_real(beta) and 0 < beta < 1 for beta in (beta1, beta2)):
        raise InvalidArtifact(f"AdaLoRA beta1 and beta2 must lie strictly between 0 and 1, not {beta1!r}, {beta2!r}")
    if not (_real(orth_reg_weight) and orth_reg_weight >= 0):
        raise InvalidArtifact(f"AdaLoRA orth_reg_weight must be a non-negative number, not {orth_reg_weight!r}")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def orthogonality(handle: SiteHandle) -> torch.Tensor:
    """PEFT's orthogonal regularizer: the mean over every ``lora_A`` and ``lora_B`` of ``‖A Aᵀ − I‖_F`` and
    ``‖BᵀB − I‖_F`` (the paper's R(P, Q) of §3.1, without its squares), a scalar on the first delta's device."""
    terms = []
    for delta in handle.deltas():
        for cov in (delta.lora_A @ delta.lora_A.T, delta.lora_B.T @ delta.lora_B):
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.norm(cov - eye))
    return sum(term.to(terms[0].device) for term in terms) / len(terms)


def budget(config: Mapping[str, Any], initial: int, target: int, step: int) -> tuple[int, bool]:
    """PEFT's cubic budget schedule (``RankAllocator.budget_schedule``): the total rank allowed after optimizer
    step ``step`` and whether to mask down to it now."""
    tinit, tfinal, total = config["tinit"], config["tfinal"], config["total_step"]
    if step <= tinit:
        return initial, False
    if step > total - tfinal:
        return target, True
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((initial - target) * remaining**3 + target), step % config["deltaT"] == 0


def update_importance(deltas: Sequence[AdaLoraDelta], beta1: float, beta2: float) -> None:
    """Smooth every entry's sensitivity ``|w · ∂L/∂w|`` (β1) and its uncertainty (β2), as PEFT's ``update_ipt``."""
    with torch.no_grad():
        for delta in deltas:
            for name in SCORED:
                param = getattr(delta, name)
                sensitivity = (param * param.grad).abs()
                smoothed, uncertainty = delta.importance.get(name) or (torch.zeros_like(param),) * 2
                smoothed = beta1 * smoothed + (1 - beta1) * sensitivity
                uncertainty = beta2 * uncertainty + (1 - beta2) * (sensitivity - smoothed).abs()
                delta.importance[name] = (smoothed, uncertainty)


def mask_to_budget(deltas: Mapping[str, AdaLoraDelta], initial: int, kept_total: int) -> dict[str, torch.Tensor]:
    """Zero the singular values of the ``initial − kept_total`` lowest-scored triplets across all modules (ties at
    the threshold go too, as in PEFT's ``mask_to_budget``); the kept triplets of each module ([r] bools)."""
    scores = {}
    for path, delta in deltas.items():
        score = {name: smoothed * uncertainty for name, (smoothed, uncertainty) in delta.importance.items()}
        scores[path] = score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))
    threshold = torch.kthvalue(torch.cat([s.cpu() for s in scores.values()]), k=initial - kept_total).values.item()
    kept = {}
    with torch.no_grad():
        for path, delta in deltas.items():
            dropped = scores[path] <= threshold
            delta.lora_E.masked_fill_(dropped.view(-1, 1), 0.0)
            kept[path] = ~dropped.cpu()
    return kept


def allocate(handle: SiteHandle, step: int) -> None:
    """PEFT's ``update_and_allocate`` after optimizer step ``step`` (from 1), before the gradients are cleared. At
    the final allocation the config gains PEFT's ``rank_pattern`` (``<module>.lora_E`` → kept mask)."""
    config = handle.layout.config
    deltas: dict[str, AdaLoraDelta] = dict(zip(handle.paths, handle.deltas(), strict=True))
    final = config["total_step"] - config["tfinal"]
    initial = sum(delta.lora_A.shape[0] for delta in deltas.values())
    target = config["target_r"] * len(deltas)
    if step < final:
        update_importance(list(deltas.values()), config["beta1"], config["beta2"])
        allowed, mask = budget(config, initial, target, step)
        if mask:
            mask_to_budget(deltas, initial, allowed)
    elif step == final:
        kept = mask_to_budget(deltas, initial, target)
        for path, delta in deltas.items():
            delta.kept, delta.importance = kept[path], {}
        config["rank_pattern"] = {f"{path}.lora_E": mask.tolist() for path, mask in kept.items()}
    else:
        with torch.no_grad():
            for delta in deltas.values():
                delta.lora_E.masked_fill_(~delta.kept.view(-1, 1).to(delta.lora_E.device), 0.0)


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
    recipes = {"adalora": {}}
    # SmolLM2-135M-nf4, date task: exact match 1.00 (12 steps: 0.86 at lr 5e-2, 0.00 at 5e-3 and 1e-1). E starts at
    # zero and one learning rate serves P, Λ and Q, so it needs more steps than LoRA (bench/bench_train_tasks.py).
    default_lr = 3e-2
    default_steps = 24
    make = staticmethod(new_adapter)
    notes = "trained with PEFT's rank allocator (orthogonal regularizer, cubic budget); attached in its saved form"

    def check_options(self, options: Mapping[str, Any]) -> None:
        names = inspect.signature(check_settings).parameters
        check_settings(**{key: value for key, value in options.items() if key in names})

    def training_loss(self, handle: SiteHandle) -> torch.Tensor | None:
        weight = float(handle.layout.config.get("orth_reg_weight", 0.5))
        return weight * orthogonality(handle) if weight > 0 else None

    def after_step(self, handle: SiteHandle, step: int) -> None:
        allocate(handle, step)

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
