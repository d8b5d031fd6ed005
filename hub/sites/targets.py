"""Which modules an adapter adapts: PEFT's target matching, checked against a model before anything changes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hub.errors import Incompatible, InvalidArtifact
from hub.formats.peft import KEY_PREFIX
from hub.sites.adapted import find_module, own_modules, unwrap
from hub.sites.deltas import SavedModule
from hub.sites.quant import is_quantized, linear_dims


def target_modules(model: nn.Module, targets: Sequence[str], *, method: str,
                   all_required: bool = True) -> dict[str, nn.Module]:
    """The modules PEFT's ``target_modules=targets`` selects in ``model``, by path. A target the user named that
    matches no module is refused, by name (a typo would otherwise train an adapter on fewer layers than asked);
    of a method's default targets (``all_required=False``), those the model has are taken, at least one."""
    if isinstance(targets, str) or not targets:
        raise InvalidArtifact(f"{method} needs a non-empty list of target module names, not {targets!r}")
    config = {"target_modules": list(targets)}
    found = {path: module for path, module in own_modules(model) if peft_targets(config, path)}
    missing = [t for t in targets if not any(path == t or path.endswith(f".{t}") for path in found)]
    if missing and (all_required or not found):
        raise Incompatible(f"{method}: {type(model).__name__} has no module named {', '.join(missing)}")
    return found


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

    ``refuse`` maps config keys that select a variant this runtime does not compute to the reason why. Tensors
    outside the method's own are whole modules the adapter replaces (``saved_modules``) or copies of a targeted
    embedding's base layer, which must be the model's own.
    """
    config = adapter.config
    method = adapter.method
    for key, why in (refuse or {}).items():
        if config.get(key) not in (None, False, [], {}, "", "none"):
            raise Incompatible(f"{method} adapter uses {key}={_show(config[key])}, which the runtime cannot run: {why}")
    if config.get("target_parameters"):
        raise Incompatible(f"{method} adapter targets parameters ({_show(config['target_parameters'])}), not modules")
    for key, tensor in adapter.tensors.items():
        if ".base_layer." in key:
            _check_saved_base_weight(model, key.removeprefix(KEY_PREFIX), tensor)
    targets = []
    for path, params in adapter.modules().items():
        if not peft_targets(config, path):
            raise InvalidArtifact(
                f"{method} adapter has tensors for {path}, which its own config does not target"
                f" (target_modules={_show(config.get('target_modules'))},"
                f" layers_to_transform={_show(config.get('layers_to_transform'))})"
            )
        module = find_module(model, path)
        if module is None:
            raise Incompatible(f"adapter targets module {path}, which this {type(model).__name__} does not have")
        targets.append(Target(path, unwrap(module), dict(params)))
    return targets


def saved_modules(model: nn.Module, adapter: Any) -> dict[str, SavedModule]:
    """The modules the adapter carries whole (PEFT's ``modules_to_save``, e.g. a retrained ``lm_head``), as
    replacements of the model's, checked against them: same kind of layer, same shapes."""
    found = {}
    for path, params in adapter.kind.saved_modules(adapter.tensors).items():
        module = find_module(model, path)
        if module is None:
            raise Incompatible(f"adapter carries a copy of {path}, which this {type(model).__name__} does not have")
        layer = unwrap(module)
        weight = params.get("weight")
        own = getattr(layer, "weight", None)
        dims = linear_dims(layer)
        shape = (layer.num_embeddings, layer.embedding_dim) if isinstance(layer, nn.Embedding) else (
            None if dims is None else (dims[1], dims[0]))
        if weight is None or shape is None or not isinstance(own, torch.Tensor):
            raise Incompatible(f"adapter carries a copy of {path} (a {type(layer).__name__}), which the hub"
                               " runtime can only swap for linear layers and embeddings with their weight")
        if tuple(weight.shape) != shape:
            have, need = "×".join(map(str, shape)), "×".join(map(str, weight.shape))
            hint = ": resized vocabulary?" if isinstance(layer, nn.Embedding) or weight.shape[1:] == shape[1:] else ""
            raise Incompatible(f"adapter replaces {path} with a {need} copy, this model's is {have}{hint}")
        bias = params.get("bias")
        if bias is not None and tuple(bias.shape) != shape[:1]:
            raise Incompatible(f"adapter's copy of {path} has a bias of shape {tuple(bias.shape)}, not {shape[:1]}")
        found[path] = SavedModule(weight.to(site_device(layer)), None if bias is None else bias.to(site_device(layer)))
    return found


def _check_saved_base_weight(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """PEFT saves a targeted embedding's own weight beside its adapter (``save_embedding_layers``, as
    ``<module>.base_layer.weight``): harmless when it is the model's weight, another base when it is not."""
    path = key.rsplit(".base_layer.", 1)[0]
    module = find_module(model, path)
    weight = getattr(unwrap(module), "weight", None) if module is not None else None
    if not isinstance(weight, torch.Tensor) or is_quantized(unwrap(module)):
        return
    if tuple(weight.shape) != tuple(tensor.shape):
        raise Incompatible(f"adapter was saved on a {'×'.join(map(str, tensor.shape))} {path}, this model's is"
                           f" {'×'.join(map(str, weight.shape))}: resized vocabulary?")
    if not torch.equal(weight.detach().to(tensor.dtype), tensor):
        raise Incompatible(f"adapter was saved with another {path} than this model's: it is for another base")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
