"""Learned composition weights: the per-adapter weights of a weighted sum fitted on a few examples (LoraHub).

LoraHub (Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition", COLM 2024;
sail-sg/lorahub ``lorahub/algorithm.py``) searches w ∈ [−1.5, 1.5]^K, starting at 0, gradient-free (CMA-ES) for 40
evaluations of ``loss(Σ wᵢ·LoRAᵢ) + 0.05·mean|wᵢ|`` on ~5 examples of an unseen task. Its bounds, penalty and
budget are the defaults here; ``start="zero", top_k=None, objective="loss"`` is its search exactly.

Over a registry's pool (many adapters, most unrelated) that search from 0 spends its 40 evaluations in a
K-dimensional space and lands on large weights for unrelated adapters (bench/bench_compose_auto.py: 0.70-0.90 of
the task's own expert). The default start is retrieval first (``start="rank"``, as ``hub.rank`` by loss): each
adapter alone, at weight 1, is one evaluation, scored per example; the search then moves only the ``top_k``
adapters best on the most examples (ties: lowest mean loss; on a mixed set of tasks the mean loss can put an
adapter fair on every task above an expert best on its third of them) and starts at the better of the best one
alone and those k at weight 1 each. The best point evaluated wins, so the result is never worse on the examples
than the best single adapter.

The default objective is not the mean token loss but ``match_probability``: 1 − the mean over the examples of
the probability of the whole completion, P(completion | prompt) = exp(−Σ token losses), i.e. one minus the exact
match expected when sampling, plus 0.1 × the mean token loss (where no completion is likely, the first term is
flat, and CMA-ES, which only ranks points, then searches as on the loss). Experts trained apart interfere when
summed, and on a mixed set the loss-optimal weights blend them until none completes its own examples (bench,
5 examples per task: date 0.35, name 0.15, record 0.26 → exact match 0.28, below the best single adapter's 0.33);
this objective rewards completing some examples whole (date 0.59, name 0.43, record 0.17 → 0.60). On a single
task both keep the task's expert.

No trial merges anything: the adapters are attached once as a stack, each at static weight 1, and a trial sets
their gates to w (``hub.sites`` gates: ``y = base(x) + Σ wᵢ·Δᵢ(x)``), which for additive deltas (the LoRA family)
is exactly the exact weighted sum's forward. The search is a well-kept library's CMA-ES (``cma``, pycma by
N. Hansen) rather than our own; ``method="gradient"`` instead trains w as tensors through the same gates with Adam
(the base and adapters frozen; quantized bases stay quantized). Either way the base is only read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hub.composition.members import check_distinct, common_base, default_hub
from hub.errors import Incompatible, InvalidArtifact, NotFound

if TYPE_CHECKING:
    from torch import nn

    from hub.client import Hub
    from hub.composition.members import Member
    from hub.data import Encoded, Example

METHODS = ("cma", "gradient")
STARTS = ("rank", "zero")
OBJECTIVES = ("loss", "match_probability")
MATCH_LOSS_SHARE = 0.1  # the loss's share in the match_probability objective


@dataclass(frozen=True)
class SearchConfig:
    """How the weights are searched. ``method``: ``cma`` (CMA-ES, gradient-free) or ``gradient`` (Adam on the
    weights). ``budget``: loss evaluations in all (CMA-ES's trials or Adam's steps, and with ``start="rank"`` one
    per adapter before them). ``bounds``: every weight is kept in [low, high]. ``l1``: the penalty
    ``l1 · mean|wᵢ|`` added to the loss. ``start``: ``rank`` (retrieval first, see the module docstring) or
    ``zero`` (LoraHub's: every weight 0 (CMA-ES) or 1/K (Adam), all of them searched). ``top_k``: with ``rank``,
    how many adapters the search moves, those best alone on the most examples (None: all). ``sigma``: CMA-ES's
    initial step size; ``lr``: Adam's learning rate. ``seed``: CMA-ES's sampling. ``objective``:
    ``match_probability`` (1 − the mean probability of each example's whole completion, see the module docstring)
    or ``loss`` (the mean completion-token cross-entropy, LoraHub's). LoraHub's search: ``start="zero",
    top_k=None, objective="loss"``."""

    method: str = "cma"
    budget: int = 40
    bounds: tuple[float, float] = (-1.5, 1.5)
    l1: float = 0.05
    seed: int = 0
    sigma: float = 0.5
    lr: float = 0.1
    start: str = "rank"
    top_k: int | None = 3
    objective: str = "match_probability"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise Incompatible(f"unknown weight search {self.method!r} (known: {', '.join(METHODS)})")
        if self.start not in STARTS:
            raise Incompatible(f"unknown search start {self.start!r} (known: {', '.join(STARTS)})")
        if self.objective not in OBJECTIVES:
            raise Incompatible(f"unknown objective {self.objective!r} (known: {', '.join(OBJECTIVES)})")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise Incompatible(f"the search budget must be a whole number >= 1, not {self.budget!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise Incompatible(f"top_k must be a whole number >= 1 or None, not {self.top_k!r}")
        bounds = tuple(self.bounds) if isinstance(self.bounds, (tuple, list)) else (self.bounds,)
        if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
            raise Incompatible(f"weight bounds are two numbers (low, high), not {self.bounds!r}")
        low, high = (float(b) for b in bounds)
        # Adapters the search does not move stay at weight 0, so 0 must be a weight the bounds allow.
        if not (math.isfinite(low) and math.isfinite(high) and low <= 0 <= high and low < high):
            raise Incompatible(f"weight bounds must be finite with low <= 0 <= high and low < high, not {bounds}")
        object.__setattr__(self, "bounds", (low, high))
        for key in ("l1", "sigma", "lr"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise Incompatible(f"{key} must be a finite number >= 0, not {value!r}")
        if self.sigma == 0 or self.lr == 0:
            raise Incompatible("sigma and lr must be above 0")

    def to_dict(self) -> dict[str, Any]:
        settings = {"method": self.method, "budget": self.budget, "bounds": list(self.bounds), "l1": self.l1,
                    "seed": self.seed, "start": self.start, "objective": self.objective}
        settings.update({"top_k": self.top_k} if self.start == "rank" else {})
        settings.update({"sigma": self.sigma} if self.method == "cma" else {"lr": self.lr})
        return settings


@dataclass(frozen=True)
class WeightSearch:
    """The search's outcome: ``weights`` (one per adapter, in input order); ``loss``: mean completion-token
    cross-entropy (nats) of the stack at those weights on the examples, ``objective``: the settings' objective
    there + L1 term; ``evaluations``: losses computed (each adapter alone, CMA-ES's trials, Adam's steps);
    ``alone``: with ``start="rank"``, each adapter's mean token loss alone at weight 1 (input order; empty
    otherwise); ``wins``: on how many examples each adapter alone had the lowest loss of all (input order; empty
    otherwise); ``searched``: the indices of the adapters the search moved (the others stay at 0);
    ``examples_sha256``: see examples_digest; ``seconds``: wall time."""

    weights: list[float]
    loss: float
    objective: float
    evaluations: int
    examples: int
    examples_sha256: str
    settings: SearchConfig
    seconds: float
    alone: list[float] = field(default_factory=list)
    wins: list[int] = field(default_factory=list)
    searched: list[int] = field(default_factory=list)
    history: list[float] = field(default_factory=list, repr=False)  # the objective per evaluation or step

    def to_recipe(self) -> dict[str, Any]:
        """What the composition's recipe records (no timings: a recipe describes how to reproduce the result)."""
        return {**self.settings.to_dict(), "examples": self.examples,
                "examples_sha256": self.examples_sha256, "evaluations": self.evaluations,
                "weights": [round(w, 6) for w in self.weights], "loss": self.loss,
                "objective_value": self.objective,
                "alone": [round(v, 6) for v in self.alone], "wins": self.wins, "searched": self.searched}


def search_weights(
    model: nn.Module,
    tokenizer: Any,
    members: Sequence[Member],
    examples: Sequence[Example],
    settings: SearchConfig | None = None,
    *,
    batch_size: int = 16,
    allow_structural: bool = False,
) -> WeightSearch:
    """Fit one weight per member on ``examples`` (prompt/completion pairs; loss on the completions) with
    ``model`` (any causal LM, full precision or bitsandbytes nf4/int8; only read). The members are attached for
    the search and detached after it, whatever happens.

    Raises InvalidArtifact (no examples, one longer than the context), Incompatible (members that do not attach
    to this model, ``start="rank"`` with a budget that does not exceed the number of members).
    """
    from hub.data import encode_all
    from hub.runtime import attach, gate_context, place
    from hub.sites import disable_cpu_repacking

    settings = settings or SearchConfig()
    check_searchable(members)
    if not examples:
        raise InvalidArtifact("weights='auto' needs examples to fit the weights on")
    count = len(members)
    if settings.start == "rank" and settings.budget <= count:
        raise Incompatible(f"start='rank' scores each of the {count} adapters alone first: give a budget above "
                           f"{count}, not {settings.budget}")
    encoded, pad = encode_all(model, tokenizer, examples)
    batches = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    device = place(model)
    disable_cpu_repacking(model)  # the gradient search backpropagates through bitsandbytes' fp32 CPU path
    handle = attach(model, [m.adapter for m in members], name=[f"auto-weight.{i}" for i in range(count)],
                    weight=1.0, base_fingerprint=common_base(members), allow_structural=allow_structural)
    names = [h.name for h in handle.handles]
    gates = gate_context(model)
    was_training = model.training
    model.eval()  # dropout off: the weights are judged as they will run
    start = time.perf_counter()
    try:
        def losses_at(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with gates.routed(names, weights):
                return _losses(model, batches, pad, device)

        trials = _Trials(losses_at, count, settings)
        origin, searched, alone, wins = _start(trials, count, settings)
        run = _cma if settings.method == "cma" else _gradient
        run(trials, origin, searched, settings)
    finally:
        handle.detach()
        model.train(was_training)
    return WeightSearch(weights=trials.best, loss=trials.best_loss, objective=trials.best_value,
                        evaluations=len(trials.history), examples=len(examples),
                        examples_sha256=examples_digest(examples), settings=settings,
                        seconds=time.perf_counter() - start, alone=alone, wins=wins, searched=searched,
                        history=trials.history)


def check_searchable(members: Sequence[Member]) -> None:
    """The search moves gates on attached adapters, whose forward equals the weighted sum's for additive deltas
    (the LoRA family) only: IA3's scaling vectors and virtual tokens are refused, as is one adapter listed twice.
    Raises Incompatible."""
    check_distinct(members, "weight search")
    for member in members:
        if not member.adapter.kind.low_rank:
            raise Incompatible(f"{member.label} ({member.adapter.method}): weights='auto' searches sums of additive "
                               "adapters (the LoRA family), whose gated forward is exactly the sum's")


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 of the examples' prompts and completions in order (JSON), so a recipe names what it was fitted on."""
    text = json.dumps([[example.prompt, example.completion] for example in examples], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class _Trials:
    """The objective (``settings.objective`` + ``l1·mean|w|``) at full weight vectors, every evaluation recorded,
    the best point kept with its objective and mean token loss."""

    def __init__(self, losses_at: Any, count: int, settings: SearchConfig) -> None:
        self.losses_at, self.count, self.l1, self.objective = losses_at, count, settings.l1, settings.objective
        self.history: list[float] = []
        self.best: list[float] = [0.0] * count
        self.best_value = self.best_loss = math.inf

    def penalty(self, weights: Sequence[float]) -> float:
        return self.l1 * sum(abs(w) for w in weights) / self.count

    def value(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(objective without the penalty, mean completion-token loss, each example's mean token loss) at
        ``weights``; differentiable."""
        sums, tokens = self.losses_at(weights)
        loss = sums.sum() / tokens.sum().clamp(min=1)
        # 1 − the mean probability of each whole completion (the exact match expected when sampling), plus a tenth of
        # the loss: CMA-ES ranks points, so where no completion is likely this orders them as the loss does.
        objective = loss if self.objective == "loss" else 1 - torch.exp(-sums).mean() + MATCH_LOSS_SHARE * loss
        return objective, loss, sums / tokens.clamp(min=1)

    def __call__(self, weights: Sequence[float]) -> float:
        return self.per_example(weights)[0]

    def per_example(self, weights: Sequence[float]) -> tuple[float, float, list[float]]:
        """The objective at ``weights`` (recorded), the mean token loss and each example's mean token loss."""
        with torch.no_grad():
            objective, loss, each = self.value(torch.tensor(weights, dtype=torch.float32))
        return self.record(weights, float(objective) + self.penalty(weights), float(loss)), float(loss), each.tolist()

    def record(self, weights: Sequence[float], value: float, loss: float) -> float:
        self.history.append(value)
        if value < self.best_value:
            self.best, self.best_value, self.best_loss = [float(w) for w in weights], value, loss
        return value


def _start(trials: _Trials, count: int, settings: SearchConfig
           ) -> tuple[list[float], list[int], list[float], list[int]]:
    """The search's starting point, the indices it moves, each adapter's mean loss alone and its wins
    (``start="rank"``)."""
    low, high = settings.bounds
    if settings.start == "zero":
        return [min(max(0.0, low), high)] * count, list(range(count)), [], []
    one = min(max(1.0, low), high)
    alone, values, per_example = [], [], []
    for i in range(count):
        point = [0.0] * count
        point[i] = one
        value, loss, losses = trials.per_example(point)
        alone.append(loss)
        values.append(value)
        per_example.append(losses)
    # Retrieval per example: on a mixed set the mean loss can put a distractor that is fair on every task above an
    # expert that is best on its third of the examples, so the adapters best on the most examples are searched.
    wins = [0] * count
    for losses in zip(*per_example, strict=True):
        wins[min(range(count), key=losses.__getitem__)] += 1
    order = sorted(range(count), key=lambda i: (-wins[i], alone[i]))
    searched = sorted(order[:settings.top_k or count])
    first = min(searched, key=values.__getitem__)
    origin = [one if i == first else 0.0 for i in range(count)]
    if len(searched) > 1 and len(trials.history) < settings.budget:
        # Experts trained on different tasks are trained to run at weight 1: their sum is the other natural start.
        together = [one if i in searched else 0.0 for i in range(count)]
        if trials(together) < values[first]:
            origin = together
    return origin, searched, alone, wins


def _losses(model: nn.Module, batches: Sequence[Sequence[Encoded]], pad: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's summed cross-entropy over its completion tokens and its number of them ([examples] each;
    their ratio of sums is the mean ``hub.evaluate`` computes)."""
    from hub.data import collate

    sums, tokens = [], []
    for batch in batches:
        ids, labels, mask = (t.to(device) for t in collate(batch, pad_id=pad))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -ids.shape[1]:-1].float()
        targets = labels[:, 1:]
        scored = targets != -100
        each = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        sums.append((each * scored).sum(dim=1))
        tokens.append(scored.sum(dim=1))
    return torch.cat(sums), torch.cat(tokens)


def _cma(trials: _Trials, origin: list[float], searched: list[int], settings: SearchConfig) -> None:
    """CMA-ES over the ``searched`` weights from ``origin`` within the bounds until the budget is spent."""
    with warnings.catch_warnings():  # pycma warns at import when matplotlib (plots only) is missing
        warnings.simplefilter("ignore")
        import cma

    low, high = settings.bounds
    left = settings.budget - len(trials.history)
    if left < 1:
        return
    x0 = [origin[i] for i in searched]

    def full(point: Sequence[float]) -> list[float]:
        weights = [0.0] * len(origin)
        for i, w in zip(searched, point, strict=True):
            weights[i] = float(w)
        return weights

    # pycma draws a random seed for 0 and takes at most 2**32 - 1: every seed maps to an explicit, reproducible one.
    strategy = cma.CMAEvolutionStrategy(x0, settings.sigma, {"bounds": [low, high],
                                                             "seed": settings.seed % (2**32 - 1) + 1,
                                                             "verbose": -9, "maxfevals": left})
    while len(trials.history) < settings.budget:
        points = strategy.ask()
        points = points[:settings.budget - len(trials.history)]
        values = [trials(full(point)) for point in points]
        if len(values) < strategy.popsize:
            break  # the budget ended inside a generation: pycma takes only whole ones
        strategy.tell(points, values)


def _gradient(trials: _Trials, origin: list[float], searched: list[int], settings: SearchConfig) -> None:
    """Adam on the ``searched`` weights from ``origin`` (a weight at 0 starts at 1/K instead: an adapter whose gate
    is 0 is skipped and would get no gradient), clamped to the bounds after every step, until the budget is spent."""
    low, high = settings.bounds
    count = len(origin)
    index = torch.tensor(searched)
    free = torch.tensor([origin[i] or min(max(1.0 / count, low), high) for i in searched], requires_grad=True)
    optimizer = torch.optim.Adam([free], lr=settings.lr)
    while len(trials.history) < settings.budget:
        weights = torch.zeros(count).index_put((index,), free)
        value, loss, _ = trials.value(weights)
        objective = value + settings.l1 * weights.abs().mean()
        trials.record(weights.detach().tolist(), float(objective.detach()), float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        with torch.no_grad():
            free.clamp_(low, high)


def fit_weights(
    members: Sequence[Member],
    *,
    examples: Sequence[Example] = (),
    data: str | os.PathLike[str] | None = None,
    settings: SearchConfig | None = None,
    base: str | os.PathLike[str] | Any | None = None,
    quantize: str | None = "nf4",
    device: str | None = None,
    hub: Hub | None = None,
) -> WeightSearch:
    """``search_weights`` on ``examples`` plus a JSONL file ``data`` (chats rendered with the base's template), on
    ``base``: a loaded ``hub.runtime.Base``, or a folder / Hub id loaded once here (``quantize``, ``device``);
    default the members' registered base. Everything checkable is checked before the model loads. Raises
    Incompatible (no base known, no examples), NotFound, InvalidArtifact."""
    from hub.client import resolve_base
    from hub.data import read_jsonl
    from hub.runtime import Base, load_tokenizer

    if isinstance(examples, (str, os.PathLike)):
        raise Incompatible("examples are prompt/completion Examples: pass a JSONL file as data=")
    check_searchable(members)
    if base is None:
        base = next((m.base_name for m in members if m.base_name), None)
        if base is None:
            raise Incompatible("weights='auto' needs a base to fit on, and no member's registry entry names one:"
                               " pass base=")
    loaded = base if isinstance(base, Base) else None
    path = loaded.path if loaded is not None else resolve_base(base)
    tokenizer = loaded.tokenizer if loaded is not None else load_tokenizer(path)
    if tokenizer is None:
        raise NotFound(f"the base at {path} has no tokenizer to read the examples with")
    examples = [*examples, *(read_jsonl(data, tokenizer=tokenizer) if data is not None else ())]
    if not examples:
        raise Incompatible("weights='auto' needs examples to fit the weights on: give examples or a data file")
    loaded = loaded or default_hub(hub).load_base(path, quantize=quantize, device=device)
    return search_weights(loaded.model, loaded.tokenizer, members, examples, settings)
