"""Deltas: one adapter's part at one site, by the role it plays there (additive, input or output transform)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hub.sites.quant import base_bias, base_weight

if TYPE_CHECKING:
    from hub.sites.adapted import AdaptedSite


class Delta(nn.Module):
    """One adapter's part at one site. ``roles`` say how the site uses it (see ``hub.sites``): "additive"
    (``forward(x, base)``), "input" (``transform_input``), "output" (``transform_output``), "replace"
    (``replace(x, layer)``: the module itself, swapped for the adapter's copy)."""

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


class SavedModule(Delta):
    """PEFT's ``modules_to_save``: the adapter carries its own copy of the whole module (a retrained head), which
    replaces the model's while attached. At a linear site ``replace(x) = x Wᵀ + b``; at an embedding the rows of
    ``weight``. A gate g between 0 and 1 interpolates the two modules' outputs (weights, once merged)."""

    roles = frozenset({"replace"})
    reads_base = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.float32, copy=True), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32, copy=True),
                                                           requires_grad=False)

    def replace(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        if isinstance(layer, nn.Embedding):
            return F.embedding(x, self.weight, layer.padding_idx, layer.max_norm, layer.norm_type,
                               layer.scale_grad_by_freq, layer.sparse)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


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
