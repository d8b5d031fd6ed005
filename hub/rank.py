"""Retrieval by examples: which registered adapters do a handful of examples of an unseen task best?

Every candidate is scored on the same examples and the same base, loaded once: each is attached, scored through
``hub.evaluate.evaluate`` (mean completion loss, teacher-forced, batched; exact match by greedy generation) and
detached again, so the base is never reloaded or changed. This is the "which modules help this task" question
LoraHub's users ask (sail-sg/lorahub#10, #1) answered by measurement rather than by name or tag.

Order: exact match first (highest; what a user of the adapter gets), then the mean completion loss (lowest): with
five examples most adapters tie on exact match (none right), and the loss orders them; it also breaks ties between
adapters that get the same examples right. Without generation (``generate=False``) the loss alone orders them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hub.errors import HubError, Incompatible, InvalidArtifact, NotFound

if TYPE_CHECKING:
    from torch import nn

    from hub.client import Hub, Query
    from hub.data import Example
    from hub.fingerprint import Fingerprint


@dataclass(frozen=True)
class Candidate:
    """A registered version to score; ``match``: ``exact`` (registered on this base), ``structural`` (on a base
    with the same shapes only) or None (registered without a base)."""

    ref: str
    match: str | None = "exact"


@dataclass(frozen=True)
class Ranked:
    """One candidate's scores on the examples, or why it was skipped.

    ``loss``: mean cross-entropy per completion token (nats); ``exact_match`` and ``token_accuracy``: fractions in
    [0, 1] (``exact_match`` is NaN when not generated); ``seconds``: attach + score + detach. A skipped candidate
    (``skipped`` holds the reason: another method that cannot attach, a base that matches in shapes only...) has
    no scores and comes after every scored one.
    """

    ref: str
    match: str | None
    loss: float | None = None
    exact_match: float | None = None
    token_accuracy: float | None = None
    count: int = 0
    seconds: float = 0.0
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "match": self.match, "loss": self.loss, "exact_match": _json_number(self.exact_match),
                "token_accuracy": self.token_accuracy, "count": self.count, "seconds": round(self.seconds, 3),
                "skipped": self.skipped}


def find_candidates(hub: Hub, base: Fingerprint, refs: Sequence[str] | None, query: Query) -> list[Candidate]:
    """What to score on ``base``: the versions ``refs`` (each checked to be for this base: exactly, in shapes
    only, or registered without one), else every version ``hub.compatible`` lists for it (filtered by ``query``,
    every page). Raises NotFound (an unknown ref, nothing registered fits), Incompatible (a ref for another base,
    one version listed twice, one string instead of a list).
    """
    if isinstance(refs, str):  # a string is a sequence too: its characters would be looked up one by one
        raise Incompatible(f"candidates is a list of references: give [{refs!r}], not {refs!r}")
    if refs is not None:
        found = []
        for ref in refs:
            version = hub.get(ref)
            if any(c.ref == version.ref for c in found):
                raise Incompatible(f"{version.ref} appears twice in the candidates; list each version once")
            if version.base is None:
                found.append(Candidate(version.ref, None))
            elif version.base.weights_hash == base.weights_hash:
                found.append(Candidate(version.ref, "exact"))
            elif version.base.shape_hash == base.shape_hash:
                found.append(Candidate(version.ref, "structural"))
            else:
                raise Incompatible(f"{version.ref} is an adapter for base {version.base.weights_hash[:12]} "
                                   f"({version.base.architecture}), not for {base.weights_hash[:12]} "
                                   f"({base.architecture})")
        if not found:
            raise NotFound("no candidates given to rank")
        return found
    found, after = [], query.after
    while True:
        page = hub.compatible(base, replace(query, after=after))
        found += [Candidate(m.version.ref, "exact" if m.exact else "structural") for m in page]
        after = page.next_after
        if after is None or query.limit is not None:
            break
    if not found:
        # Name the filters: "nothing fits this base" would send a user with a mistyped --method looking elsewhere.
        filters = ", ".join(f"{key}={value!r}" for key, value in query.filters().items()
                            if value not in (None, (), False) and key not in ("after", "limit", "sort"))
        raise NotFound(f"no registered adapter fits base {base.weights_hash[:12]} ({base.architecture})"
                       + (f" with {filters}" if filters else ""))
    return found


def rank(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    candidates: Sequence[Candidate],
    *,
    hub: Hub,
    generate: bool = True,
    batch_size: int = 16,
    allow_structural: bool = False,
) -> list[Ranked]:
    """Score every candidate on ``examples`` (prompt/completion pairs) with ``model`` (any causal LM, full-precision
    or bitsandbytes nf4/int8) and return them best first (see the module docstring for the order), skipped ones
    last with their reason. Nothing stays attached afterwards.

    ``allow_structural``: also score adapters registered on a base that matches this one in shapes only (else they
    are skipped, saying so). Raises InvalidArtifact (no examples, an example longer than the model's context).
    """
    from hub.composition import activate
    from hub.evaluate import evaluate

    if not examples:
        raise InvalidArtifact("no examples to rank the adapters on")
    results = []
    for candidate in candidates:
        start = time.perf_counter()
        if candidate.match == "structural" and not allow_structural:
            results.append(Ranked(candidate.ref, candidate.match, skipped="registered on a base with the same "
                                  "shapes but other weights (allow_structural to score it anyway)"))
            continue
        try:
            handle = activate(model, candidate.ref, hub=hub, allow_structural=allow_structural)
        except HubError as exc:  # another method that cannot attach here, a mismatched structure, a missing file
            results.append(Ranked(candidate.ref, candidate.match, skipped=str(exc)))
            continue
        try:
            scores = evaluate(model, tokenizer, examples, batch_size=batch_size, generate=generate, progress=False)
        finally:
            handle.detach()
        results.append(Ranked(candidate.ref, candidate.match, loss=scores.loss, exact_match=scores.exact_match,
                              token_accuracy=scores.token_accuracy, count=scores.count,
                              seconds=time.perf_counter() - start))
    return sorted(results, key=_order)


def _order(result: Ranked) -> tuple[int, float, float]:
    if result.skipped is not None or result.loss is None:
        return (1, 0.0, 0.0)
    exact = result.exact_match if result.exact_match is not None and not math.isnan(result.exact_match) else 0.0
    return (0, -exact, result.loss)


def _json_number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value
