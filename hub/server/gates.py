"""Per-row gates: how rows that run different adapters share one forward.

Every attached adapter is a column of the model's gate context (``hub.runtime.gate_context``); a forward over B
rows sets one exclusive route of weights [B, N]: row i's plan puts each of its adapters' weights in its columns,
zeros elsewhere (exclusive: an adapter a row does not name is off for that row). A row with one adapter at weight
1 is a one-hot row, which the adapted layers compute as one batched matmul over factors gathered per row; rows
with weighted stacks go through the concatenated factors with a weight per row.

A gated mixture's experts are columns too, but their weights change per token and per decoder layer: before each
layer the mixture routes, a hook computes its gate for the rows that run it, from that layer's input hidden
states (as ``hub.composition.MixtureHandle`` does for a model with one mixture attached), and sets a per-token
route [B, S, N] for that layer: the mixture rows' expert columns from the gate times the expert weights, every
other row's weights as before. Several mixtures, and plain rows beside them, share the same forward. A
sequence-routed mixture's gate is the mean of its logits over the prompt (each sequence's first forward, which the
scheduler runs alone), kept in the row's ``gate_logits`` for every later token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hub.composition.router import gate as gate_weights
from hub.runtime import gate_context
from hub.server.plans import MixturePlan, Plan, attached_name


@dataclass
class _MixtureRows:
    mixture: MixturePlan
    rows: torch.Tensor  # row indices running this mixture
    columns: torch.Tensor  # the experts' gate columns
    weights: torch.Tensor  # the experts' member weights
    memory: list[dict[str, torch.Tensor]]  # per row: a sequence-routed gate's prompt logits [1, N] by layer path


class RowGates:
    """Sets the served model's gate context for one forward at a time (the scheduler's thread only)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.context = gate_context(model)
        self._hooked: dict[str, object] = {}  # decoder layer path → hook handle (installed once, idle when unused)
        self._step: tuple[tuple[str, ...], torch.Tensor, list[_MixtureRows]] | None = None

    @contextlib.contextmanager
    def rows(self, plans: Sequence[Plan], names: tuple[str, ...], device: torch.device,
             memory: Sequence[dict[str, torch.Tensor]]) -> Iterator[None]:
        """Route row i of the next forward through ``plans[i]``; ``names`` are the attached adapters (columns);
        ``memory[i]`` holds row i's sequence-routed gates (filled by its first forward)."""
        if not names:  # nothing attached: every row runs the bare base
            yield
            return
        column = {name: i for i, name in enumerate(names)}
        weights = torch.zeros(len(plans), len(names))
        groups: dict[str, tuple[MixturePlan, list[int]]] = {}
        for row, plan in enumerate(plans):
            for digest, weight in plan.members:
                weights[row, column[attached_name(digest)]] = weight
            if plan.mixture is not None:
                groups.setdefault(plan.mixture.digest, (plan.mixture, []))[1].append(row)
        weights = weights.to(device)
        mixtures = []
        for mixture, rows in groups.values():
            self._hook(mixture)
            mixture.gate.to(device)
            mixtures.append(_MixtureRows(
                mixture, torch.tensor(rows, device=device),
                torch.tensor([column[attached_name(d)] for d, _ in mixture.experts], device=device),
                torch.tensor([w for _, w in mixture.experts], dtype=weights.dtype, device=device),
                [memory[row] for row in rows]))
        self._step = (names, weights, mixtures) if mixtures else None
        try:
            with self.context.routed(names, weights, exclusive=True):
                yield
        finally:
            self._step = None

    def _hook(self, mixture: MixturePlan) -> None:
        for path in mixture.layers:
            if path not in self._hooked:
                layer = self.model.get_submodule(path)
                self._hooked[path] = layer.register_forward_pre_hook(self._before_layer(path), with_kwargs=True)

    def _before_layer(self, path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._step is None:
                return
            names, weights, mixtures = self._step
            hidden = args[0] if args else kwargs["hidden_states"]
            tokens = hidden.shape[1]
            routed = weights.unsqueeze(1).repeat(1, tokens, 1)  # [B, S, N]
            for group in mixtures:
                mixture = group.mixture
                if path not in mixture.layers:
                    continue
                index = mixture.layers.index(path)
                if mixture.routing == "sequence":
                    logits = _sequence_logits(group, hidden, index, path)
                else:
                    logits = mixture.gate(hidden[group.rows], index)
                experts = gate_weights(logits, temperature=mixture.temperature, top_k=mixture.top_k)
                block = routed[group.rows]
                block[:, :, group.columns] = experts.to(routed.dtype) * group.weights
                routed[group.rows] = block
            self.context.set(names, routed, exclusive=True)

        return hook


def _sequence_logits(group: _MixtureRows, hidden: torch.Tensor, index: int, path: str) -> torch.Tensor:
    """The rows' sequence-routed gate logits [R, 1, N] at one layer: at a sequence's first forward (its prompt, run
    alone, unpadded) the mean of the per-token logits, remembered; afterwards the remembered ones."""
    stored = [memory.get(path) for memory in group.memory]
    if all(logits is not None for logits in stored):
        return torch.stack(stored)
    logits = group.mixture.gate(hidden[group.rows], index)
    pooled = logits.sum(1, keepdim=True) / logits.shape[1]  # as MixtureHandle pools a prompt with no padding
    for memory, row in zip(group.memory, pooled, strict=True):
        memory[path] = row
    return pooled
