"""Handles of adapters attached as deltas at sites: detach, train, write back, merge into the base."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hub.errors import Conflict, Incompatible, InvalidArtifact, NotFound
from hub.formats import Adapter
from hub.formats.peft import KEY_PREFIX
from hub.sites.adapted import AdaptedEmbedding, AdaptedLinear, AdaptedSite, _parent, find_module
from hub.sites.deltas import Delta
from hub.sites.gates import gate_context
from hub.sites.quant import is_quantized, quantization_of
from hub.sites.targets import saved_modules

log = logging.getLogger(__name__)

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
        found = {parts: key for key in adapter.tensors if (parts := adapter.kind.split_key(key)) is not None}
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
        return require_grad(self.parameters())

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
                transposed = isinstance(layer, Conv1D)
                _write(self.model, layer, "weight", weight.t() if transposed else weight)
                if bias is not None:
                    _write(self.model, layer, "bias", bias)
        self.detach()


def _write(model: nn.Module, layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set ``layer.<name>`` to ``value``: in place when the tensor is the layer's own; when other parameters or
    buffers share its storage (tied input and output embeddings, any aliased tensor), the layer gets a copy of its
    own instead, so the merge changes this layer only, and the model's config stops declaring the tie."""
    current = getattr(layer, name)
    if current is None:  # a replaced module (modules_to_save) brings a bias the layer did not have
        setattr(layer, name, nn.Parameter(value.to(layer.weight.dtype).contiguous(), requires_grad=False))
        return
    if not shares_storage(model, current):
        current.copy_(value.to(current.dtype))
        return
    setattr(layer, name, nn.Parameter(value.to(current.dtype).contiguous(), requires_grad=current.requires_grad))
    config = getattr(model, "config", None)
    for part in (config, getattr(config, "get_text_config", lambda: None)()):
        if getattr(part, "tie_word_embeddings", False):
            part.tie_word_embeddings = False
    log.info("merging untied %s from the tensors that shared its storage", name)


def shares_storage(model: nn.Module, tensor: torch.Tensor) -> bool:
    """Whether any other parameter or buffer name of ``model`` reaches ``tensor``'s storage."""
    storage = tensor.untyped_storage().data_ptr()
    names = [name for name, other in (*model.named_parameters(remove_duplicate=False),
                                      *model.named_buffers(remove_duplicate=False))
             if other.untyped_storage().data_ptr() == storage]
    return len(names) > 1


def attach_deltas(model: nn.Module, deltas: dict[str, Delta], *, adapter: Adapter, name: str,
                  weight: float) -> SiteHandle:
    """Wrap each path's module in its site (once) and add the deltas built from ``adapter``, with the modules the
    adapter carries whole (modules_to_save) swapped in. The caller has validated its deltas; this checks the
    saved modules and that the name is free, before changing anything."""
    saved = saved_modules(model, adapter)
    both = sorted(set(saved) & set(deltas))
    if both:
        raise InvalidArtifact(f"adapter both adapts and replaces {both[0]}")
    deltas = {**deltas, **saved}
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
    return SiteHandle(model=model, name=name, method=adapter.method, paths=list(deltas), layout=layout)


def require_grad(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """``parameters`` as a list, each switched to require gradients (a handle's ``trainable_parameters``)."""
    params = list(parameters)
    for param in params:
        param.requires_grad_(True)
    return params
