"""Attach adapters to a model, detach them, merge them.

``attach`` checks everything it can before the first module changes (the base, then each method's own checks:
target modules, shapes, ranks); a list of adapters is a stack and attaches whole or not at all. The base check
works on any model the user loaded (``hub.runtime.identity``); which check passed is on the handle
(``base_check``) and logged. The model
keeps a registry of what is attached (``attached(model)``) and, for routing, a gate context
(``hub.sites.gate_context``).

Each adapter attaches through its method (``adapter.kind``, from the table in ``hub.methods.table``):
``method.attach(model, adapter, *, name, weight) -> Handle``; a method the hub only stores says so. A handle that
also has ``merge_into_base()`` can be merged; ``dequantize_merged`` merges every attached adapter into a
full-precision copy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hub.errors import Conflict, Incompatible, InvalidArtifact, NotFound
from hub.fingerprint import Fingerprint
from hub.formats import Adapter
from hub.methods.base import Handle
from hub.runtime.identity import IDENTITY_ATTR, BaseCheck, check_base
from hub.sites import (
    AdaptedEmbedding,
    AdaptedLinear,
    AdaptedSite,
    base_bias,
    base_weight,
    disable_cpu_repacking,
    is_quantized,
)

REGISTRY_ATTR = "hub_adapters"


def attached(model: nn.Module) -> dict[str, Handle]:
    """The adapters attached to ``model`` through this module, by name, in attach order."""
    registry = model.__dict__.get(REGISTRY_ATTR)
    if registry is None:
        registry = {}
        model.__dict__[REGISTRY_ATTR] = registry
    return registry


@dataclass
class AttachedHandle:
    """What ``attach`` returns for one adapter: the method's handle, kept in the model's registry."""

    model: nn.Module
    inner: Handle
    base_check: BaseCheck | None = None  # which base check passed (None: the adapter named no base)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def method(self) -> str:
        return self.inner.method

    def __getattr__(self, item: str) -> Any:
        # Method-specific extras (parameters(), set_weight(), ...) pass through.
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(item)
        return getattr(inner, item)

    def detach(self) -> None:
        registry = attached(self.model)
        if registry.get(self.name) is not self:
            raise NotFound(f"adapter {self.name!r} is not attached")
        self.inner.detach()
        del registry[self.name]

    def merge_into_base(self) -> None:
        merge = getattr(self.inner, "merge_into_base", None)
        if merge is None:
            raise Incompatible(f"{self.method} adapters cannot be merged into base weights")
        merge()
        del attached(self.model)[self.name]


@dataclass
class StackHandle:
    """Several adapters attached together (``attach(model, [a, b])``); detaching it detaches them all."""

    model: nn.Module
    name: str
    handles: list[AttachedHandle]
    method: str = "stack"
    base_check: BaseCheck | None = None

    def detach(self) -> None:
        for handle in reversed(self.handles):
            handle.detach()

    def merge_into_base(self) -> None:
        for handle in self.handles:
            handle.merge_into_base()


def check_fingerprint(model: nn.Module, expected: Fingerprint, *, allow_structural: bool = False) -> BaseCheck:
    """Refuse a model that is not the base an adapter was trained on (unless only structure must match and does);
    see ``hub.runtime.identity.check_base``. Raises Incompatible."""
    return check_base(model, expected, allow_structural=allow_structural)


def attach(
    model: nn.Module,
    adapter_or_list: Adapter | Sequence[Adapter],
    *,
    name: str | Sequence[str] | None = None,
    weight: float | Sequence[float] = 1.0,
    allow_structural: bool = False,
    base_fingerprint: Fingerprint | None = None,
) -> AttachedHandle | StackHandle:
    """Attach one adapter, or several as a stack (each with its own weight), without touching the base weights.

    ``name`` defaults to the method name (made unique); for a list, a single name ``n`` gives ``n.0, n.1, ...``.
    ``base_fingerprint``: the fingerprint of the base the adapter(s) were trained on, checked against the model
    (any loaded model: see ``hub.runtime.identity``); a base that matches in shapes only is refused unless
    ``allow_structural``. On a bitsandbytes model, 4-bit layers are kept on their fp32 dequantize+matmul CPU path
    (``disable_cpu_repacking``), as ``load_base`` does, so results and gradients match the hub-loaded base.
    A model whose ``device_map`` offloads layers (to the CPU or disk: meta tensors) is refused. On any error the
    model is left exactly as it was. Raises Incompatible, InvalidArtifact, Conflict.
    """
    adapters = [adapter_or_list] if isinstance(adapter_or_list, Adapter) else list(adapter_or_list)
    if not adapters:
        raise InvalidArtifact("no adapter to attach")
    for adapter in adapters:
        if not isinstance(adapter, Adapter):
            raise InvalidArtifact(f"cannot attach a {type(adapter).__name__}: read it with hub.formats.read_adapter")
    names = _names(model, adapters, name)
    weights = [float(weight)] * len(adapters) if isinstance(weight, (int, float)) else [float(w) for w in weight]
    if len(weights) != len(adapters):
        raise Incompatible(f"{len(weights)} weights for {len(adapters)} adapters")
    methods = [adapter.kind for adapter in adapters]
    for method in methods:
        if not method.attachable:
            raise method.cannot("attached")
    # accelerate swaps an offloaded layer's weights in and out around each forward; an adapter on such a layer
    # computes garbage (NaN), so refuse rather than attach.
    offloaded = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if offloaded is not None:
        raise Incompatible(f"{offloaded} is offloaded by the model's device_map (meta device): adapters cannot be"
                           " attached to offloaded layers; load the model with every layer on a device")
    check = None
    if base_fingerprint is not None:
        check = check_fingerprint(model, base_fingerprint, allow_structural=allow_structural)
    disable_cpu_repacking(model)
    registry = attached(model)
    done: list[AttachedHandle] = []
    try:
        for adapter, method, adapter_name, adapter_weight in zip(adapters, methods, names, weights, strict=True):
            inner = method.attach(model, adapter, name=adapter_name, weight=adapter_weight)
            handle = AttachedHandle(model, inner, check)
            registry[adapter_name] = handle
            done.append(handle)
    except BaseException:
        # A later adapter of a stack failed its checks: undo the earlier ones, leaving the model as it was.
        for handle in reversed(done):
            handle.detach()
        raise
    if isinstance(adapter_or_list, Adapter):
        return done[0]
    return StackHandle(model, name if isinstance(name, str) else "+".join(names), done, base_check=check)


def _names(model: nn.Module, adapters: list[Adapter], name: str | Sequence[str] | None) -> list[str]:
    taken = set(attached(model))
    if name is None:
        names = []
        for adapter in adapters:
            candidate, i = adapter.method, 1
            while candidate in taken or candidate in names:
                candidate, i = f"{adapter.method}-{i}", i + 1
            names.append(candidate)
        return names
    if isinstance(name, str):
        names = [name] if len(adapters) == 1 else [f"{name}.{i}" for i in range(len(adapters))]
    else:
        names = list(name)
    if len(names) != len(adapters):
        raise Incompatible(f"{len(names)} names for {len(adapters)} adapters")
    if len(set(names)) != len(names):
        raise Conflict(f"adapter names repeat: {names}")
    for n in names:
        if not isinstance(n, str) or not n:
            raise InvalidArtifact(f"adapter name {n!r} is not a non-empty string")
        if n in taken:
            raise Conflict(f"an adapter named {n!r} is already attached")
    return names


def detach(model: nn.Module, name_or_handle: str | Handle) -> None:
    """Detach an adapter (or a stack) by name or handle, restoring the original modules."""
    if isinstance(name_or_handle, str):
        handle = attached(model).get(name_or_handle)
        if handle is None:
            raise NotFound(f"no adapter named {name_or_handle!r} is attached")
        handle.detach()
        return
    name_or_handle.detach()


def merge_into_base(model: nn.Module, name: str) -> None:
    """Merge an attached adapter into the full-precision base weights in place, then detach it.

    A quantized base is refused (requantizing NF4 erases most of a small delta): use ``dequantize_merged``.
    """
    handle = attached(model).get(name)
    if handle is None:
        raise NotFound(f"no adapter named {name!r} is attached")
    handle.merge_into_base()


def dequantize_merged(model: nn.Module, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A new full-precision model: the base dequantized (if quantized) with every attached adapter merged in at
    its static weight. The model itself is not changed; nothing is requantized."""
    for handle in attached(model).values():
        inner = getattr(handle, "inner", handle)
        if getattr(inner, "merge_into_base", None) is None:
            raise Incompatible(f"{handle.method} adapter {handle.name!r} cannot be merged into base weights")
    # deepcopy with every site and quantized layer pre-mapped to its merged full-precision replacement: the copy
    # never touches bitsandbytes parameters (some do not survive deepcopy) and keeps everything else as it was.
    memo: dict[int, Any] = {}
    for module in list(model.modules()):
        if isinstance(module, AdaptedSite):
            memo[id(module)] = _merged_module(module, dtype)
        elif is_quantized(module) and id(module) not in memo:
            memo[id(module)] = _plain_linear(module, base_weight(module), base_bias(module), dtype)
    for key in (REGISTRY_ATTR, "hub_gates", "hub_fingerprint", IDENTITY_ATTR):
        if key in model.__dict__:
            memo[id(model.__dict__[key])] = None
    merged = copy.deepcopy(model, memo)
    for key in (REGISTRY_ATTR, "hub_gates", "hub_fingerprint", IDENTITY_ATTR, "hf_quantizer", "quantization_method"):
        merged.__dict__.pop(key, None)
    config = getattr(merged, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if flag in merged.__dict__:
            merged.__dict__[flag] = False
    merged.to(dtype)
    return merged.eval()


def _merged_module(site: AdaptedSite, dtype: torch.dtype) -> nn.Module:
    weight, bias = site.merged()
    layer = site.base_layer
    if isinstance(site, AdaptedEmbedding):
        plain = copy.deepcopy(layer)
        plain.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        return plain
    assert isinstance(site, AdaptedLinear)
    if isinstance(layer, Conv1D):
        plain = Conv1D(weight.shape[0], weight.shape[1])
        plain.weight = nn.Parameter(weight.t().contiguous().to(dtype), requires_grad=False)
        plain.bias = nn.Parameter(
            (bias if bias is not None else torch.zeros(weight.shape[0])).to(dtype), requires_grad=False
        )
        return plain
    return _plain_linear(layer, weight, bias, dtype)


def _plain_linear(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    plain.requires_grad_(False)
    plain.train(layer.training)
    return plain
