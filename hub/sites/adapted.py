"""Adapted sites: a model's own module, untouched, and the deltas attached to it (see ``hub.sites``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hub.errors import Conflict, Incompatible, NotFound
from hub.sites.deltas import BaseView, Delta, LowRankDelta, _Bank, needs_live, version_key
from hub.sites.gates import GateContext, Route, _fit_rows
from hub.sites.quant import base_bias, base_weight, linear_dims

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
            for role in ("replace", "additive", "input", "output")
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

    def _base_output(self, x: torch.Tensor, route: Route | None, args: tuple, kwargs: dict) -> torch.Tensor:
        """The base layer's output, or the output of the module an adapter replaces it with (modules_to_save)."""
        replacing = self.entries("replace")
        if not replacing:
            return self.base_layer(x, *args, **kwargs)
        replacements = [(delta, gate) for name, delta in replacing if (gate := self._gate(name, route, x)) is not None]
        if len(replacements) == 1 and isinstance(replacements[0][1], float) and replacements[0][1] == 1:
            return replacements[0][0].replace(x, self.base_layer).to(self._out_dtype(x))
        y = self.base_layer(x, *args, **kwargs)
        for delta, gate in replacements:
            y = _mix(y, delta.replace(x, self.base_layer).to(y.dtype), gate)
        return y

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        weight = getattr(self.base_layer, "weight", None)
        return weight.dtype if isinstance(self.base_layer, nn.Embedding) else x.dtype

    def _replaced_weight(self, weight: torch.Tensor, bias: torch.Tensor | None,
                         chosen: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) with the chosen adapters' replacement modules mixed in at their static weights."""
        for name, delta in self.entries("replace"):
            if name in chosen:
                g = self.weights[name]
                weight = weight + g * (delta.weight.to(weight.dtype) - weight)
                if bias is not None or delta.bias is not None:
                    own = torch.zeros_like(weight[:, 0]) if bias is None else bias
                    saved = torch.zeros_like(own) if delta.bias is None else delta.bias.to(own.dtype)
                    bias = own + g * (saved - own)
        return weight, bias

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
        y = self._base_output(h, route, args, kwargs)
        raw = y if h is x and not self.entries("replace") else None
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
        with torch.no_grad():
            weight, bias = self._replaced_weight(raw, bias, chosen)
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
        y = self._base_output(ids, route, args, kwargs)
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
        raw = self.base_layer.weight.detach().to(self.adapter_dtype)
        with torch.no_grad():
            weight, _ = self._replaced_weight(raw, None, chosen)
            for name, delta in zip(self.names, self.deltas, strict=True):
                if name in chosen and "additive" in delta.roles:
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
