"""Gates: per-forward routing of the adapters attached to one model (see ``hub.sites`` for the semantics)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hub.errors import Incompatible


@dataclass
class Route:
    """Routed weights for one forward: ``weights`` is [N], [B, N] or [B, S, N] over ``names``."""

    names: tuple[str, ...]
    weights: torch.Tensor
    # Exclusive routes switch off every attached adapter they do not name (a mixed batch); otherwise those keep
    # their static weight (always-on adapters beside routed experts).
    exclusive: bool = False
    index: dict[str, int] = field(init=False)
    active: frozenset[str] = field(init=False)
    # One-hot rows (each row at most one non-zero adapter): its index (len(names) = none) and weight per row.
    row_index: torch.Tensor | None = field(init=False, default=None)
    row_gate: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.weights.dim() not in (1, 2, 3) or self.weights.shape[-1] != len(self.names):
            raise Incompatible(
                f"gate weights of shape {tuple(self.weights.shape)} do not fit {len(self.names)} adapters:"
                " expected [N], [B, N] or [B, S, N]"
            )
        if len(set(self.names)) != len(self.names):
            raise Incompatible(f"gate names repeat an adapter: {list(self.names)}")
        self.index = {name: i for i, name in enumerate(self.names)}
        nonzero = self.weights.detach() != 0
        # One host sync per routed forward (not per layer): which adapters run at all, and whether rows are one-hot.
        used = nonzero.reshape(-1, len(self.names)).any(dim=0).tolist()
        self.active = frozenset(name for name, on in zip(self.names, used, strict=True) if on)
        if self.weights.dim() == 2 and int(nonzero.sum(dim=1).max()) <= 1:
            detached = nonzero.any(dim=1)
            self.row_index = torch.where(detached, nonzero.int().argmax(dim=1), len(self.names))
            picked = self.weights.gather(1, self.row_index.clamp(max=len(self.names) - 1).unsqueeze(1)).squeeze(1)
            self.row_gate = picked * detached

    @property
    def kind(self) -> str:
        return ("adapter", "rows", "tokens")[self.weights.dim() - 1]

    def gate(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The routed weight of ``name`` shaped to broadcast over ``like`` ([B, S, ..., features])."""
        column = self.weights[..., self.index[name]]
        if column.dim() == 0:
            return column
        column = _fit_rows(column, like.shape[0])
        if column.dim() == 2 and (like.dim() < 3 or like.shape[1] != column.shape[1]):
            raise Incompatible(
                f"per-token gates of shape {tuple(column.shape)} do not match activations {tuple(like.shape)}"
            )
        return column.reshape(*column.shape, *([1] * (like.dim() - column.dim())))


def _fit_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat gate rows when generation expanded the batch (beams, several sequences per prompt)."""
    if tensor.shape[0] == rows:
        return tensor
    if rows % tensor.shape[0]:
        raise Incompatible(f"gates for {tensor.shape[0]} rows cannot route a batch of {rows}")
    return tensor.repeat_interleave(rows // tensor.shape[0], dim=0)


class GateContext:
    """Per-forward routing shared by every adapted site of one model. See the module docstring."""

    def __init__(self) -> None:
        self.route: Route | None = None
        self.per_site: dict[str, Route] = {}

    @property
    def on(self) -> bool:
        return self.route is not None or bool(self.per_site)

    def set(
        self,
        names: Sequence[str],
        weights: torch.Tensor | Sequence[float],
        *,
        per_site: dict[str, torch.Tensor] | None = None,
        exclusive: bool = False,
    ) -> None:
        names = tuple(names)
        tensor = weights if isinstance(weights, torch.Tensor) else torch.tensor(list(weights), dtype=torch.float32)
        route = Route(names, tensor, exclusive)
        sites = {path: Route(names, value, exclusive) for path, value in (per_site or {}).items()}
        self.route, self.per_site = route, sites

    def clear(self) -> None:
        self.route, self.per_site = None, {}

    def for_site(self, path: str) -> Route | None:
        return self.per_site.get(path, self.route) if self.per_site else self.route

    @contextlib.contextmanager
    def routed(
        self,
        names: Sequence[str],
        weights: torch.Tensor | Sequence[float],
        *,
        per_site: dict[str, torch.Tensor] | None = None,
        exclusive: bool = False,
    ) -> Iterator[GateContext]:
        previous = (self.route, self.per_site)
        self.set(names, weights, per_site=per_site, exclusive=exclusive)
        try:
            yield self
        finally:
            self.route, self.per_site = previous

    def rows(self, assignment: Sequence[str | None]) -> contextlib.AbstractContextManager[GateContext]:
        """A mixed batch: row i runs adapter ``assignment[i]`` alone (None: the base alone)."""
        names = tuple(dict.fromkeys(name for name in assignment if name is not None))
        weights = torch.zeros(len(assignment), len(names))
        for row, name in enumerate(assignment):
            if name is not None:
                weights[row, names.index(name)] = 1.0
        return self.routed(names, weights, exclusive=True)


def gate_context(model: nn.Module) -> GateContext:
    """The model's GateContext, created on first use."""
    context = model.__dict__.get("hub_gates")
    if context is None:
        context = GateContext()
        model.__dict__["hub_gates"] = context
    return context
