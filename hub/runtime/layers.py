"""Adapted sites: a model's own module, untouched, plus the adapters' deltas attached to it.

One wrapper per kind of site:

* ``AdaptedLinear`` wraps ``nn.Linear``, bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` and transformers'
  ``Conv1D`` (GPT-2)::

      y = T_out( base( T_in(x) ) ) + Σ_k g_k · Δ_k(x)

  ``T_in`` / ``T_out`` are the multiplicative methods (IA3, OFT, BOFT); they act on the frozen base only, as if
  they rescaled or rotated its weight. ``Δ_k`` are the additive ones (LoRA, AdaLoRA, DoRA, LoHa, LoKr); every
  one reads the unmodified input ``x``. A gated transform is ``x + g·(T(x) − x)``: exact for g ∈ {0, 1}, an
  interpolation between (IA3: the scale ``1 + g·(l − 1)``).
* ``AdaptedEmbedding`` wraps ``nn.Embedding``: ``y = base(ids) + Σ_k g_k · Δ_k(ids)``.

Gates. Every delta has a static weight (``attach(weight=...)``, ``SiteHandle.set_weight``). On top of that, a
``GateContext`` shared by every site of a model (``gate_context(model)``, stored as ``model.hub_gates``) routes
adapters per forward: ``ctx.set(names, weights)`` with ``weights`` of shape

* ``[N]``: one weight per adapter (a runtime weighted sum / stack);
* ``[B, N]``: one weight per batch row (a mixed batch is one-hot rows: ``ctx.rows(["a", "b", None, ...])``);
* ``[B, S, N]``: one weight per token (a mixture: the router sets them before each forward);

and ``per_site={module_path: tensor}`` overrides them for single sites (layer-wise mixtures). A routed adapter's
gate is ``static weight × routed weight``; attached adapters that are not among ``names`` keep their static
weight, unless the route is ``exclusive`` (``rows()`` is: each row runs its adapter alone); an adapter whose routed
weight is zero everywhere is skipped (top-k mixtures cost only the experts they use). Rows of the gate are repeated
to the batch when generation expands it (beam search). Gates are tensors, so a router trained through them gets
gradients. The context is per model and not thread-safe: one routed forward at a time.

Sites are found by the module paths in the adapter file; a site (or any other wrapper that keeps the module it
wraps as ``base_layer``) is walked through transparently, so adapters keep addressing modules by their original
names whatever is attached around them.

Low-rank deltas (LoRA, AdaLoRA) are computed together: one adapter directly; several with static or per-token
gates as one matmul pair over their concatenated factors; one-hot rows with a batched matmul over the factors
gathered per row. No Python loop over adapters per layer on those paths.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hub.errors import Conflict, Incompatible, InvalidArtifact, NotFound
from hub.formats import Adapter
from hub.formats.peft import KEY_PREFIX, split_key

# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes: recognise its layers and read their weights only through its own current-format calls.


def _bnb() -> Any | None:
    try:
        import bitsandbytes
    except ImportError:  # the hub runs without bitsandbytes on full-precision bases
        return None
    return bitsandbytes


def is_bnb_4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_bnb_8bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    return is_bnb_4bit(module) or is_bnb_8bit(module)


def quantization_of(model: nn.Module) -> str | None:
    """"nf4"/"fp4" or "int8" when the model holds bitsandbytes layers, else None."""
    for module in model.modules():
        if is_bnb_4bit(module):
            return str(module.weight.quant_type)
        if is_bnb_8bit(module):
            return "int8"
    return None


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module, None for anything else."""
    if isinstance(module, nn.Linear):  # bitsandbytes' layers are nn.Linear subclasses
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as [out, in], dequantized for bitsandbytes layers.

    Full-precision layers return their parameter (a transposed view for Conv1D); quantized ones a new tensor.
    """
    if is_bnb_4bit(module):
        import bitsandbytes.functional as bnbf

        weight = module.weight
        state = weight.quant_state
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacked this layer for its AVX512-BF16 kernel; dequantize_4bit would read that layout
            # as the standard one and return garbage. Undo the packing with its own inverse, on copies, so the
            # live layer keeps working in whatever format it is in.
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state)
    if is_bnb_8bit(module):
        import bitsandbytes.functional as bnbf

        weight = module.weight
        if module.state.has_fp16_weights:
            return weight.data
        cb = module.state.CB if module.state.CB is not None else weight.data
        scb = module.state.SCB if module.state.SCB is not None else weight.SCB
        return bnbf.int8_vectorwise_dequant(cb, scb)
    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def base_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def disable_cpu_repacking(model: nn.Module) -> int:
    """Keep every bitsandbytes Linear4bit on its differentiable dequantize+matmul path on CPU.

    With AVX512-BF16, bitsandbytes switches a Linear4bit to a packed kernel the first time it runs in eval mode
    without grad, and keeps it; that kernel has no autograd (training after any evaluation would lose the
    gradient through the frozen base) and computes in bf16. A layer already packed (a model the user ran before
    handing it over) is unpacked with bitsandbytes' own inverse. Returns the number of layers changed.
    """
    count = 0
    for module in model.modules():
        if is_bnb_4bit(module):
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data,
                                                                                         weight.quant_state)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------
# Gates


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


# ---------------------------------------------------------------------------------------------------------------
# Deltas


class Delta(nn.Module):
    """One adapter's part at one site. ``roles`` say how the site uses it (see the module docstring):
    "additive" (``forward(x, base)``), "input" (``transform_input``), "output" (``transform_output``)."""

    roles: ClassVar[frozenset[str]] = frozenset({"additive"})
    # True when the delta's effect depends on the base weight (DoRA's norm, IA3/OFT/BOFT acting on the base):
    # merging another adapter into that weight would change it.
    reads_base: ClassVar[bool] = False
    # PEFT's name under the module for each parameter whose attribute name differs ("lora_A" -> "lora_A.weight");
    # the others are saved under their attribute name.
    file_names: ClassVar[dict[str, str]] = {}

    def file_parameters(self) -> dict[str, nn.Parameter]:
        """This delta's parameters by their name in the adapter file (under the module's path)."""
        return {self.file_names.get(attr, attr): p for attr, p in self.named_parameters()}


class AdditiveDelta(Delta):
    """``forward(x, base) -> Δ(x)``; ``base`` gives the site's base weight and raw output if the delta needs them."""

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW ([out, in], or [num_embeddings, dim] at an embedding) such that Δ(x) = ΔW x (+ delta_bias)."""
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        return None


class LowRankDelta(AdditiveDelta):
    """Δ(x) = B_s (A x) + b_s, with the scaling folded into ``factors()``; computed in batches across adapters."""

    dropout: nn.Module | None = None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A [r, in], B·scale [out, r], bias·scale [out] or None)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base: BaseView | None = None) -> torch.Tensor:
        a, b, bias = self.factors()
        if self.dropout_active:
            x = self.dropout(x)
        return F.linear(F.linear(x, a), b, bias)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        a, b, _ = self.factors()
        return b @ a

    def delta_bias(self) -> torch.Tensor | None:
        return self.factors()[2]

    @property
    def dropout_active(self) -> bool:
        return self.training and self.dropout is not None


class InputTransform(Delta):
    """``transform_input(x) -> T(x)`` applied to the base layer's input; ``matrix()`` M with T(x) = x @ M."""

    roles = frozenset({"input"})
    reads_base = True

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix().to(x.dtype)

    def matrix(self) -> torch.Tensor:
        raise NotImplementedError


class OutputTransform(Delta):
    """``transform_output(y, bias)`` scales the base layer's output by ``scale()`` per output feature, its bias
    included or not (``scales_bias``)."""

    roles = frozenset({"output"})
    reads_base = True
    scales_bias: ClassVar[bool] = True

    def scale(self) -> torch.Tensor:
        raise NotImplementedError

    def transform_output(self, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = self.scale().to(y.dtype)
        if self.scales_bias or bias is None:
            return y * s
        return (y - bias) * s + bias


class BaseView:
    """Lazy access to the base layer for deltas that read it (DoRA): its weight and its output without bias."""

    def __init__(self, site: AdaptedSite, x: torch.Tensor, raw: torch.Tensor | None, args: tuple, kwargs: dict):
        self.site, self.x, self._raw, self._args, self._kwargs = site, x, raw, args, kwargs

    @property
    def layer(self) -> nn.Module:
        return self.site.base_layer

    def weight(self) -> torch.Tensor:
        return base_weight(self.site.base_layer)

    def output_without_bias(self) -> torch.Tensor:
        if self._raw is None:
            self._raw = self.site.base_layer(self.x, *self._args, **self._kwargs)
        bias = base_bias(self.site.base_layer)
        return self._raw if bias is None else self._raw - bias


def version_key(params: Sequence[torch.Tensor]) -> tuple[tuple[int, int, int], ...]:
    """A cache key that changes when a tensor is updated in place, replaced, or moved (``module.to``)."""
    return tuple((id(p), p._version, p.data_ptr()) for p in params)


def needs_live(params: Sequence[torch.Tensor]) -> bool:
    """Derived tensors must be rebuilt in the autograd graph while their sources are being trained."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


class _Bank:
    """The factors of several low-rank deltas concatenated ([R, in], [out, R]) and padded per adapter."""

    def __init__(self, deltas: Sequence[LowRankDelta]):
        factors = [d.factors() for d in deltas]
        self.ranks = [a.shape[0] for a, _, _ in factors]
        self.offsets = [sum(self.ranks[:i]) for i in range(len(self.ranks))]
        self.a = torch.cat([a for a, _, _ in factors])
        self.b = torch.cat([b for _, b, _ in factors], dim=1)
        biases = [bias for _, _, bias in factors]
        self.bias = None
        if any(bias is not None for bias in biases):
            zero = self.b.new_zeros(self.b.shape[0])
            self.bias = torch.stack([zero if bias is None else bias for bias in biases])
        self._factors = factors
        self._padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A [m+1, rmax, in], B [m+1, out, rmax], bias [m+1, out]: slot m is zero (rows with no adapter here)."""
        if self._padded is None:
            rmax = max(self.ranks)
            m = len(self.ranks)
            a = self.a.new_zeros(m + 1, rmax, self.a.shape[1])
            b = self.b.new_zeros(m + 1, self.b.shape[0], rmax)
            for i, (fa, fb, _) in enumerate(self._factors):
                a[i, : fa.shape[0]] = fa
                b[i, :, : fb.shape[1]] = fb
            bias = None
            if self.bias is not None:
                bias = torch.cat([self.bias, self.bias.new_zeros(1, self.bias.shape[1])])
            self._padded = (a, b, bias)
        return self._padded

    def select(self, keep: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(keep) == len(self.ranks):
            return self.a, self.b
        rows = [slice(self.offsets[i], self.offsets[i] + self.ranks[i]) for i in keep]
        return torch.cat([self.a[s] for s in rows]), torch.cat([self.b[:, s] for s in rows], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Sites

Gate = float | torch.Tensor | None  # None: the delta does not run in this forward


class AdaptedSite(nn.Module):
    """A model's module (``base_layer``, never modified) and the deltas attached to it, in attach order."""

    def __init__(self, base_layer: nn.Module, *, path: str, context: GateContext):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleList()
        self.names: list[str] = []
        self.weights: dict[str, float] = {}
        self.path = path
        self.hub_context = context
        self.adapter_dtype = torch.float32
        self._bank_cache: dict[tuple[str, ...], tuple[Any, _Bank]] = {}
        self._lookup_cache: tuple[Any, ...] | None = None
        self._roles: dict[str, list[tuple[str, Delta]]] = {}

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def add(self, name: str, delta: Delta, weight: float) -> None:
        if name in self.weights:
            raise Conflict(f"adapter {name!r} is already attached at {self.path}")
        self.deltas.append(delta)
        self.names.append(name)
        self.weights[name] = float(weight)
        self._changed()

    def remove(self, name: str) -> Delta:
        if name not in self.weights:
            raise NotFound(f"adapter {name!r} is not attached at {self.path}")
        i = self.names.index(name)
        delta = self.deltas[i]
        del self.deltas[i]
        del self.names[i]
        del self.weights[name]
        self._changed()
        return delta

    def _changed(self) -> None:
        self._bank_cache.clear()
        self._lookup_cache = None
        self._roles = {
            role: [(n, d) for n, d in zip(self.names, self.deltas, strict=True) if role in d.roles]
            for role in ("additive", "input", "output")
        }

    def delta(self, name: str) -> Delta:
        return self.deltas[self.names.index(name)]

    def entries(self, role: str) -> list[tuple[str, Delta]]:
        return self._roles.get(role, [])

    def __len__(self) -> int:
        return len(self.names)

    # -- gates -------------------------------------------------------------------------------------------------
    def _gate(self, name: str, route: Route | None, like: torch.Tensor) -> Gate:
        static = self.weights[name]
        if route is None or name not in route.index:
            return None if static == 0 or (route is not None and route.exclusive) else static
        if name not in route.active or static == 0:
            return None
        routed = route.gate(name, like)
        return routed if static == 1 else routed * static

    def _bank(self, names: tuple[str, ...], deltas: Sequence[LowRankDelta]) -> _Bank:
        params = [p for d in deltas for p in d.parameters()]
        if needs_live(params):
            return _Bank(deltas)
        key = version_key(params)
        cached = self._bank_cache.get(names)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, _Bank(deltas))
            self._bank_cache[names] = cached
        return cached[1]

    def _additive(self, x: torch.Tensor, route: Route | None, base: BaseView) -> torch.Tensor | None:
        """Σ_k g_k Δ_k(x) in the adapters' dtype, or None when no additive delta runs."""
        total: torch.Tensor | None = None
        lowrank: list[tuple[str, LowRankDelta]] = []
        for name, delta in self.entries("additive"):
            if isinstance(delta, LowRankDelta) and not delta.dropout_active:
                lowrank.append((name, delta))
                continue
            gate = self._gate(name, route, x)
            if gate is not None:
                out = delta(x, base)
                out = out if isinstance(gate, float) and gate == 1 else out * gate
                total = out if total is None else total + out
        if lowrank:
            out = self._lowrank(x, route, lowrank)
            if out is not None:
                total = out if total is None else total + out
        return total

    def _lowrank(
        self, x: torch.Tensor, route: Route | None, entries: list[tuple[str, LowRankDelta]]
    ) -> torch.Tensor | None:
        total = None
        if route is not None and route.row_index is not None:
            routed = [(n, d) for n, d in entries if n in route.index]
            if routed:
                total = self._one_hot_rows(x, route, routed)
                entries = [(n, d) for n, d in entries if n not in route.index]
        gated = [(n, d, g) for n, d in entries if (g := self._gate(n, route, x)) is not None]
        if not gated:
            return total
        if len(gated) == 1:
            _, delta, gate = gated[0]
            out = delta(x)
            out = out if isinstance(gate, float) and gate == 1 else out * gate
        else:
            out = self._concatenated(x, [n for n, _ in entries], [d for _, d in entries], gated)
        return out if total is None else total + out

    def _concatenated(
        self, x: torch.Tensor, names: list[str], deltas: list[LowRankDelta], gated: list[tuple[str, Any, Gate]]
    ) -> torch.Tensor:
        """Several adapters, any gates: one matmul over their stacked A, gates per rank column, one over B."""
        bank = self._bank(tuple(names), deltas)
        keep = [names.index(n) for n, _, _ in gated]
        a, b = bank.select(keep)
        lead = x.shape[:-1]
        columns = []
        for i, (_, _, gate) in zip(keep, gated, strict=True):
            rank = bank.ranks[i]
            if isinstance(gate, float):
                columns.append(x.new_full((*([1] * len(lead)), rank), gate))
            else:
                columns.append(gate.to(x.dtype).expand(*gate.shape[:-1], rank))
        if all(c.dim() == len(lead) + 1 and all(s == 1 for s in c.shape[:-1]) for c in columns):
            scale = torch.cat(columns, dim=-1)
        else:
            scale = torch.cat([c.expand(*lead, c.shape[-1]) for c in columns], dim=-1)
        out = F.linear(F.linear(x, a) * scale, b)
        if bank.bias is not None:
            for i, (_, _, gate) in zip(keep, gated, strict=True):
                out = out + bank.bias[i] * gate
        return out

    def _one_hot_rows(self, x: torch.Tensor, route: Route, routed: list[tuple[str, LowRankDelta]]) -> torch.Tensor:
        """Mixed batch: each row its own adapter, as a batched matmul over the factors gathered per row."""
        names = [n for n, _ in routed]
        bank = self._bank(tuple(names), [d for _, d in routed])
        a, b, bias = bank.padded()
        lookup, static = self._lookup(route, names, x)
        row_index = _fit_rows(route.row_index, x.shape[0])
        idx = lookup[row_index]
        gate = _fit_rows(route.row_gate, x.shape[0]).to(x.dtype) * static[idx]
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        hidden = torch.bmm(rows, a[idx].transpose(1, 2)) * gate.view(-1, 1, 1)
        out = torch.bmm(hidden, b[idx].transpose(1, 2))
        if bias is not None:
            out = out + (bias[idx] * gate.unsqueeze(1)).unsqueeze(1)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _lookup(self, route: Route, names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route index → this site's slot (len(names): none), and static weights per slot; cached per route."""
        key = (route, names, [self.weights[n] for n in names], x.device, x.dtype)
        cached = self._lookup_cache
        if cached is None or cached[0] is not route or cached[1 : len(key)] != key[1:]:
            lookup = torch.full((len(route.names) + 1,), len(names), dtype=torch.long, device=x.device)
            for local, name in enumerate(names):
                lookup[route.index[name]] = local
            static = torch.tensor([self.weights[n] for n in names] + [0.0], dtype=x.dtype, device=x.device)
            self._lookup_cache = cached = (*key, lookup, static)
        return cached[-2], cached[-1]


class AdaptedLinear(AdaptedSite):
    """The site of a linear-like module: see the module docstring for what ``forward`` computes."""

    def __init__(self, base_layer: nn.Module, *, path: str, context: GateContext):
        dims = linear_dims(base_layer)
        if dims is None:
            raise Incompatible(f"module {path} is a {type(base_layer).__name__}, not a linear layer")
        super().__init__(base_layer, path=path, context=context)
        self.in_features, self.out_features = dims

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        context = self.hub_context
        route = context.for_site(self.path) if context.on else None
        h = x
        for name, delta in self.entries("input"):
            gate = self._gate(name, route, x)
            if gate is not None:
                h = _mix(h, delta.transform_input(h), gate)
        y = self.base_layer(h, *args, **kwargs)
        raw = y if h is x else None
        outputs = self.entries("output")
        if outputs:
            bias = base_bias(self.base_layer)
            for name, delta in outputs:
                gate = self._gate(name, route, y)
                if gate is not None:
                    y = _mix(y, delta.transform_output(y, bias), gate)
        if self.entries("additive"):
            xa = x if x.dtype == self.adapter_dtype else x.to(self.adapter_dtype)
            delta_out = self._additive(xa, route, BaseView(self, x, raw, args, kwargs))
            if delta_out is not None:
                y = y + delta_out.to(y.dtype)
        return y

    def merged(self, names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W [out, in], bias) of the base with the named deltas (default: all) merged at their static weights."""
        chosen = self.names if names is None else list(names)
        raw = base_weight(self.base_layer).detach().to(self.adapter_dtype)
        bias = base_bias(self.base_layer)
        bias = None if bias is None else bias.detach().to(self.adapter_dtype)
        weight = raw
        with torch.no_grad():
            for name, delta in zip(self.names, self.deltas, strict=True):
                if name not in chosen:
                    continue
                g = self.weights[name]
                if "input" in delta.roles:
                    eye = torch.eye(self.in_features, dtype=weight.dtype)
                    weight = weight @ (eye + g * (delta.matrix().to(weight.dtype) - eye)).t()
                if "output" in delta.roles:
                    s = 1 + g * (delta.scale().to(weight.dtype) - 1)
                    weight = s[:, None] * weight
                    if bias is not None and delta.scales_bias:
                        bias = bias * s
            for name, delta in zip(self.names, self.deltas, strict=True):
                if name not in chosen or "additive" not in delta.roles:
                    continue
                g = self.weights[name]
                weight = weight + g * delta.delta_weight(raw).to(weight.dtype)
                extra = delta.delta_bias()
                if extra is not None:
                    if bias is None:
                        raise Incompatible(
                            f"adapter {name!r} adds a bias at {self.path}, whose base layer has none: cannot merge"
                        )
                    bias = bias + g * extra.to(bias.dtype)
        return weight, bias


class AdaptedEmbedding(AdaptedSite):
    """The site of an nn.Embedding: y = base(ids) + Σ_k g_k Δ_k(ids)."""

    def __init__(self, base_layer: nn.Module, *, path: str, context: GateContext):
        if not isinstance(base_layer, nn.Embedding):
            raise Incompatible(f"module {path} is a {type(base_layer).__name__}, not an embedding")
        super().__init__(base_layer, path=path, context=context)
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        context = self.hub_context
        route = context.for_site(self.path) if context.on else None
        y = self.base_layer(ids, *args, **kwargs)
        like = y
        total = None
        for name, delta in self.entries("additive"):
            gate = self._gate(name, route, like)
            if gate is not None:
                out = delta(ids, BaseView(self, ids, y, args, kwargs))
                out = out if isinstance(gate, float) and gate == 1 else out * gate
                total = out if total is None else total + out
        return y if total is None else y + total.to(y.dtype)

    def merged(self, names: Sequence[str] | None = None) -> tuple[torch.Tensor, None]:
        chosen = self.names if names is None else list(names)
        weight = self.base_layer.weight.detach().to(self.adapter_dtype)
        raw = weight
        with torch.no_grad():
            for name, delta in zip(self.names, self.deltas, strict=True):
                if name in chosen:
                    weight = weight + self.weights[name] * delta.delta_weight(raw).to(weight.dtype)
        return weight, None


def _mix(before: torch.Tensor, after: torch.Tensor, gate: float | torch.Tensor) -> torch.Tensor:
    if isinstance(gate, float) and gate == 1:
        return after
    return before + (after - before) * gate


# ---------------------------------------------------------------------------------------------------------------
# Finding and wrapping sites


def find_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path``, walking through site wrappers (and any wrapper keeping its inner module as
    ``base_layer``) so adapters keep addressing modules by their original names."""
    module = model
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        while child is None and isinstance(module._modules.get("base_layer"), nn.Module):
            module = module._modules["base_layer"]
            child = module._modules.get(part)
        if child is None:
            return None
        module = child
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The original module under a site (the module itself when it is not wrapped)."""
    return module.base_layer if isinstance(module, AdaptedSite) else module


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module that holds the child at ``path`` (inside any wrapper on the way) and the child's name."""
    parent_path, _, attr = path.rpartition(".")
    parent = find_module(model, parent_path)
    while parent is not None and attr not in parent._modules:
        parent = parent._modules.get("base_layer")
    if parent is None:
        raise NotFound(f"module {path} not found")
    return parent, attr


def sites(model: nn.Module) -> list[AdaptedSite]:
    return [m for m in model.modules() if isinstance(m, AdaptedSite)]


def own_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module of ``model`` by its original path, each site replaced by the module it wraps (so a model
    with adapters attached lists the same modules as without)."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module._modules.items():
            if child is None:
                continue
            child = unwrap(child)
            yield prefix + name, child
            yield from walk(child, f"{prefix}{name}.")

    return walk(model, "")


def target_modules(model: nn.Module, targets: Sequence[str], *, method: str) -> dict[str, nn.Module]:
    """The modules PEFT's ``target_modules=targets`` selects in ``model``, by path; a target that matches no
    module is refused, by name (a typo would otherwise train an adapter on fewer layers than asked)."""
    if isinstance(targets, str) or not targets:
        raise InvalidArtifact(f"{method} needs a non-empty list of target module names, not {targets!r}")
    config = {"target_modules": list(targets)}
    found = {path: module for path, module in own_modules(model) if peft_targets(config, path)}
    missing = [t for t in targets if not any(path == t or path.endswith(f".{t}") for path in found)]
    if missing:
        raise Incompatible(f"{method}: {type(model).__name__} has no module named {', '.join(missing)}")
    return found


@dataclass(frozen=True)
class FileLayout:
    """Where an attached adapter's tensors go back in its file: its config, the file key and dtype of every delta
    parameter, and the method's tensors no delta holds (an AdaLoRA module pruned to rank 0). Copies of base weights
    that PEFT saves beside an embedding LoRA are not kept: attach checked they are the model's own, and they can be
    as large as the model's vocabulary."""

    config: dict[str, Any]
    keys: dict[tuple[str, str], tuple[str, torch.dtype]]  # (module path, file name) -> (file key, dtype)
    kept: dict[str, torch.Tensor]

    @classmethod
    def of(cls, adapter: Adapter, deltas: dict[str, Delta]) -> FileLayout:
        found = {parts: key for key in adapter.tensors if (parts := split_key(adapter.method, key)) is not None}
        keys: dict[tuple[str, str], tuple[str, torch.dtype]] = {}
        for path, delta in deltas.items():
            for file_name, param in delta.file_parameters().items():
                key = found.get((path, file_name), f"{KEY_PREFIX}{path}.{file_name}")
                source = adapter.tensors.get(key)
                keys[(path, file_name)] = (key, source.dtype if source is not None else param.dtype)
        used = {key for key, _ in keys.values()}
        kept = {key: adapter.tensors[key] for key in found.values() if key not in used}
        return cls(config=copy.deepcopy(adapter.config), keys=keys, kept=kept)


@dataclass
class SiteHandle:
    """An adapter attached as deltas at linear/embedding sites. ``detach()`` restores the original modules.

    ``trainable_parameters()`` and ``to_adapter()`` make it trainable: the deltas hold the adapter's tensors as
    parameters (in fp32, whatever the base), and the layout it was read with puts them back in the same file.
    """

    model: nn.Module
    name: str
    method: str
    paths: list[str]
    layout: FileLayout
    attached: bool = True

    def _sites(self) -> list[AdaptedSite]:
        found = []
        for path in self.paths:
            site = find_module(self.model, path)
            if not isinstance(site, AdaptedSite) or self.name not in site.weights:
                raise NotFound(f"adapter {self.name!r} is no longer attached at {path}")
            found.append(site)
        return found

    def deltas(self) -> list[Delta]:
        return [site.delta(self.name) for site in self._sites()]

    def parameters(self) -> Iterator[nn.Parameter]:
        for delta in self.deltas():
            yield from delta.parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """This adapter's own tensors, switched to require gradients; the base and other adapters stay frozen."""
        params = list(self.parameters())
        for param in params:
            param.requires_grad_(True)
        return params

    def to_adapter(self) -> Adapter:
        """The adapter as it is now (after training: with the trained tensors), in its file's keys, dtypes and
        config, so ``write_adapter`` gives a folder PEFT loads for every method PEFT knows."""
        tensors = dict(self.layout.kept)
        for path, delta in zip(self.paths, self.deltas(), strict=True):
            for file_name, param in delta.file_parameters().items():
                key, dtype = self.layout.keys[(path, file_name)]
                tensors[key] = param.detach().to(device="cpu", dtype=dtype, copy=True)
        return Adapter(config=copy.deepcopy(self.layout.config), tensors=tensors)

    def set_weight(self, weight: float) -> None:
        for site in self._sites():
            site.weights[self.name] = float(weight)

    def detach(self) -> None:
        if not self.attached:
            raise NotFound(f"adapter {self.name!r} is not attached")
        for site in self._sites():
            site.remove(self.name)
            if len(site) == 0:
                parent, attr = _parent(self.model, site.path)
                setattr(parent, attr, site.base_layer)
        self.attached = False

    def merge_into_base(self) -> None:
        """Add this adapter into the full-precision base weights in place, then detach it."""
        targets = self._sites()
        for site in targets:
            if is_quantized(site.base_layer):
                kind = quantization_of(site.base_layer)
                raise Incompatible(
                    f"{site.path} is quantized ({kind}): merging would requantize and erase most of the adapter;"
                    " use dequantize_merged(model) for a full-precision merged copy"
                )
            # Plain additive deltas read x, never the base weight, so they are indifferent to the merge; deltas
            # that read or transform the base weight would see it change.
            others = [n for n, d in zip(site.names, site.deltas, strict=True) if n != self.name and d.reads_base]
            if others:
                raise Incompatible(
                    f"cannot merge {self.name!r} at {site.path} while {', '.join(map(repr, others))} also act there"
                    " on the base weight: detach them first"
                )
        merged = [(site, *site.merged([self.name])) for site in targets]
        with torch.no_grad():
            for site, weight, bias in merged:
                layer = site.base_layer
                target = layer.weight.t() if isinstance(layer, Conv1D) else layer.weight
                target.copy_(weight.to(target.dtype))
                if bias is not None:
                    layer.bias.copy_(bias.to(layer.bias.dtype))
        self.detach()


def attach_deltas(
    model: nn.Module,
    deltas: dict[str, Delta],
    *,
    adapter: Adapter,
    name: str,
    method: str,
    weight: float,
) -> SiteHandle:
    """Wrap each path's module in its site (once) and add the deltas built from ``adapter``. The caller has
    validated everything; this only checks the name is free, before changing anything."""
    context = gate_context(model)
    for path in deltas:
        module = find_module(model, path)
        if isinstance(module, AdaptedSite) and name in module.weights:
            raise Conflict(f"an adapter named {name!r} is already attached at {path}")
    layout = FileLayout.of(adapter, deltas)
    for path, delta in deltas.items():
        module = find_module(model, path)
        if not isinstance(module, AdaptedSite):
            site_type = AdaptedEmbedding if isinstance(module, nn.Embedding) else AdaptedLinear
            site = site_type(module, path=path, context=context)
            parent, attr = _parent(model, path)
            setattr(parent, attr, site)
            module = site
        module.add(name, delta, weight)
    return SiteHandle(model=model, name=name, method=method, paths=list(deltas), layout=layout)


# ---------------------------------------------------------------------------------------------------------------
# Reading an adapter against a model: which modules it adapts, checked before anything is changed


def peft_targets(config: dict[str, Any], key: str) -> bool:
    """Whether PEFT would put this adapter on module ``key`` (PEFT's check_target_module_exists, 0.21.2)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    for saved in config.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){saved}($|\..*)", key):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    if not pattern:
        # The first numbered segment is the layer index (not a nested one such as an MoE expert's).
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


@dataclass
class Target:
    """One module an adapter adapts: its path, the original module, and the adapter's tensors for it."""

    path: str
    module: nn.Module
    params: dict[str, torch.Tensor]


def resolve_targets(model: nn.Module, adapter: Any, *, refuse: dict[str, str] | None = None) -> list[Target]:
    """The adapter's modules found in ``model``, in file order; raises before anything changes.

    ``refuse`` maps config keys that select a variant this runtime does not compute to the reason why.
    """
    config = adapter.config
    method = adapter.method
    for key, why in (refuse or {}).items():
        if config.get(key) not in (None, False, [], {}, "", "none"):
            raise Incompatible(f"{method} adapter uses {key}={config[key]!r}, which the runtime cannot run: {why}")
    if config.get("target_parameters"):
        raise Incompatible(f"{method} adapter targets parameters ({config['target_parameters']}), not modules")
    modules = adapter.modules()
    grouped = {f"{path}.{param}" for path, params in modules.items() for param in params}
    for key, tensor in adapter.tensors.items():
        bare = key.removeprefix("base_model.model.")
        if bare not in grouped and not _is_saved_base_weight(model, bare, tensor):
            raise Incompatible(
                f"tensor {key} is not a {method} parameter (modules_to_save, trained base biases and trainable"
                " tokens are not supported by the hub runtime)"
            )
    targets = []
    for path, params in modules.items():
        if not peft_targets(config, path):
            raise InvalidArtifact(
                f"{method} adapter has tensors for {path}, which its own config does not target"
                f" (target_modules={config.get('target_modules')!r},"
                f" layers_to_transform={config.get('layers_to_transform')!r})"
            )
        module = find_module(model, path)
        if module is None:
            raise Incompatible(f"adapter targets module {path}, which this {type(model).__name__} does not have")
        targets.append(Target(path, unwrap(module), dict(params)))
    return targets


def _is_saved_base_weight(model: nn.Module, key: str, tensor: torch.Tensor) -> bool:
    """PEFT saves a targeted embedding's own weight beside its adapter (``save_embedding_layers``): harmless when
    it is the model's weight, a different base when it is not."""
    if not key.endswith(".weight"):
        return False
    path = key.removesuffix(".weight").removesuffix(".base_layer")
    module = find_module(model, path)
    weight = getattr(unwrap(module), "weight", None) if module is not None else None
    if not isinstance(weight, torch.Tensor) or is_quantized(unwrap(module)):
        return False
    if tuple(weight.shape) != tuple(tensor.shape) or not torch.equal(weight.detach().to(tensor.dtype), tensor):
        raise Incompatible(f"adapter carries its own weights for {path}, which differ from this model's")
    return True


def expect_shape(path: str, what: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise Incompatible(f"module {path}: {what} has shape {tuple(tensor.shape)} but the model needs {tuple(shape)}")


def expect_linear(target: Target, method: str) -> tuple[int, int]:
    dims = linear_dims(target.module)
    if dims is None:
        raise Incompatible(
            f"{method} at {target.path} needs a linear layer, but the model has a {type(target.module).__name__}"
        )
    return dims


def parameter(
    tensor: torch.Tensor, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> nn.Parameter:
    """A frozen copy of an adapter tensor as a parameter (callers unfreeze them to train)."""
    return nn.Parameter(tensor.detach().to(device=device, dtype=dtype, copy=True), requires_grad=False)


def site_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
