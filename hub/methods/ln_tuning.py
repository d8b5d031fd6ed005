"""LayerNorm tuning: new parameters for chosen normalization layers (LayerNorm, RMSNorm).

PEFT's LN_TUNING saves the full tuned parameters, keyed ``base_model.model.<module>.ln_tuning_layers.weight``
(and ``.bias`` for layers that have one). The hub never writes them into the base: while the model runs, each
tuned module's parameter is swapped for the effective one just for that module's forward (a pre-hook) and put back
right after (a hook that runs even when the forward raises), so ``model.parameters()`` and ``state_dict()`` stay
the base's. With weight w, several adapters on one module combine as ``base + Σ w_k (tuned_k − base)``; a single
adapter at weight 1 uses its tuned tensor as is.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hub.errors import Incompatible, NotFound
from hub.formats import Adapter
from hub.methods.base import Method, Need
from hub.sites import find_module
from hub.sites.hooks import check_weight

PARAM_PREFIX = "ln_tuning_layers."
NAME = "ln_tuning"


class _NormSite:
    """The LN-tuning adapters attached to one module, and the hooks that swap their parameters in."""

    def __init__(self, module: nn.Module):
        self.entries: dict[str, tuple[float, dict[str, nn.Parameter]]] = {}
        self._saved: dict[str, Any] = {}
        self._hooks = [
            module.register_forward_pre_hook(self._swap_in),
            module.register_forward_hook(self._swap_out, always_call=True),
        ]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _swap_in(self, module: nn.Module, args: tuple) -> None:
        names = {pname for _, params in self.entries.values() for pname in params}
        for pname in names:
            base = module._parameters[pname]
            self._saved[pname] = base
            module._parameters[pname] = self._effective(pname, base)

    def _swap_out(self, module: nn.Module, args: tuple, output: Any) -> None:
        for pname, base in self._saved.items():
            module._parameters[pname] = base
        self._saved.clear()

    def _effective(self, pname: str, base: torch.Tensor) -> torch.Tensor:
        tuned = [(w, params[pname]) for w, params in self.entries.values() if pname in params]
        if len(tuned) == 1 and tuned[0][0] == 1.0:
            return tuned[0][1].to(base.dtype)
        value = base
        for w, param in tuned:
            value = value + w * (param.to(base.dtype) - base)
        return value


_Params = dict[str, nn.Parameter]
_SITES: weakref.WeakKeyDictionary[nn.Module, _NormSite] = weakref.WeakKeyDictionary()


class LNTuningHandle:
    """An LN-tuning adapter attached to a model."""

    method = NAME

    def __init__(self, name: str, config: dict[str, Any], modules: dict[str, tuple[nn.Module, _Params]]):
        self.name = name
        self._config = config
        self._modules = modules
        self.attached = True

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, params in self._modules.values():
            yield from params.values()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def set_weight(self, weight: float) -> None:
        weight = check_weight(self.name, weight)
        for module, params in self._modules.values():
            _SITES[module].entries[self.name] = (weight, params)

    def to_adapter(self) -> Adapter:
        """The adapter as it is now (after training, with the trained parameters)."""
        tensors = {
            f"base_model.model.{path}.{PARAM_PREFIX}{pname}": param.detach().cpu().clone()
            for path, (_, params) in self._modules.items()
            for pname, param in params.items()
        }
        return Adapter(config=dict(self._config), tensors=tensors)

    def detach(self) -> None:
        if not self.attached:
            raise NotFound(f"adapter {self.name!r} is not attached")
        for module, _ in self._modules.values():
            site = _SITES.get(module)
            if site is None:
                continue
            site.entries.pop(self.name, None)
            if not site.entries:
                site.close()
                del _SITES[module]
        self.attached = False


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> LNTuningHandle:
    """Swap ``adapter``'s normalization parameters into ``model``'s forward (the base tensors stay untouched)."""
    weight = check_weight(name, weight)
    plan: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
    for path, params in adapter.modules().items():
        module = find_module(model, path)
        if module is None:
            raise Incompatible(f"ln_tuning adapter {name!r}: the model has no module {path}")
        if module in _SITES and name in _SITES[module].entries:
            raise Incompatible(f"an adapter named {name!r} is already attached at {path}")
        tensors = {}
        for key, tensor in params.items():
            pname = key.removeprefix(PARAM_PREFIX)
            base = module._parameters.get(pname)
            if base is None:
                raise Incompatible(
                    f"ln_tuning adapter {name!r}: module {path} ({type(module).__name__}) has no parameter {pname}"
                )
            if tuple(tensor.shape) != tuple(base.shape):
                raise Incompatible(
                    f"ln_tuning adapter {name!r}: {path}.{pname} has shape {tuple(tensor.shape)}, "
                    f"the model's {tuple(base.shape)}"
                )
            tensors[pname] = tensor
        plan[path] = (module, tensors)
    attached: dict[str, tuple[nn.Module, dict[str, nn.Parameter]]] = {}
    for path, (module, tensors) in plan.items():
        params = {
            pname: nn.Parameter(t.detach().to(device=module._parameters[pname].device, dtype=torch.float32).clone())
            for pname, t in tensors.items()
        }
        site = _SITES.get(module)
        if site is None:
            site = _SITES[module] = _NormSite(module)
        site.entries[name] = (weight, params)
        attached[path] = (module, params)
    return LNTuningHandle(name, dict(adapter.config), attached)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    is_norm_type = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")
    return is_norm_type and isinstance(weight, torch.Tensor) and weight.dim() == 1


def new_adapter(model: nn.Module, *, targets: Sequence[str] | None = None) -> Adapter:
    """A fresh LN-tuning adapter holding copies of the base's parameters (so it starts as a no-op).

    ``targets``: leaf names of the normalization layers to tune (default: every LayerNorm/RMSNorm).
    """
    tensors: dict[str, torch.Tensor] = {}
    leaves: set[str] = set()
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if not _is_norm(module) or (targets is not None and leaf not in targets):
            continue
        leaves.add(leaf)
        for pname in ("weight", "bias"):
            param = module._parameters.get(pname)
            if param is not None:
                tensors[f"base_model.model.{path}.{PARAM_PREFIX}{pname}"] = param.detach().float().cpu().clone()
    missing = sorted(set(targets or ()) - leaves)
    if missing or not tensors:
        raise Incompatible(f"the model has no normalization layer named {', '.join(missing) or '(any)'}")
    config = {"peft_type": "LN_TUNING", "target_modules": sorted(leaves), "task_type": None,
              "base_model_name_or_path": getattr(model, "name_or_path", None)}
    return Adapter(config=config, tensors=tensors)


class LNTuning(Method):
    """PEFT's LN_TUNING type: the norms' own parameters, retrained, swapped in by this module's sites."""

    peft_type = "LN_TUNING"
    name = NAME
    not_additive = "LayerNorm tuning replaces norm weights, not an added ΔW"
    params = ("ln_tuning_layers.weight", "ln_tuning_layers.bias")
    attachable = True
    stackable = True
    recipes = {"ln_tuning": {}}
    default_lr = 5e-3
    make = staticmethod(new_adapter)
    notes = "replaces norm parameters: a stack interpolates them by weight"

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        self.require_modules(tensors)

    def needs(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[Need]:
        needs = super().needs(config, shapes)
        for path, params in self.modules(shapes).items():
            for param, shape in params.items():
                needs.append(Need(f"{path}.{param.removeprefix(PARAM_PREFIX)}", tuple(shape)))
        return needs

    def attach(self, model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> LNTuningHandle:
        return attach(model, adapter, name=name, weight=weight)


METHOD = LNTuning()
