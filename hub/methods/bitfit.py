"""BitFit: trained bias terms, stored as deltas (the hub's own format; docs/formats.md).

An adapter holds, per module, a bias delta Δb keyed ``base_model.model.<module>.bias``; with weight w the module
computes ``y = base(x) + w·Δb``, i.e. its bias becomes ``b + w·Δb`` (``w·Δb`` for linear layers that have no bias,
as in Llama). Deltas rather than full biases make weighted sums and merges plain sums, and let one artifact apply
to a base whose biases differ. The base module is not replaced: a forward hook adds the delta, so other adapters
wrapping the same layer (LoRA sites) compose with it; it sits on the original layer, under any such wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter
from hub.methods.base import Method
from hub.methods.config import Modules
from hub.sites import find_module
from hub.sites.hooks import HookHandle, check_weight

NAME = "bitfit"


def _innermost(module: nn.Module) -> nn.Module:
    # A site wrapper keeps the model's own layer as ``base_layer``; hook that one, which outlives the wrapper.
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def output_size(module: nn.Module) -> int | None:
    """The size of the last dimension of ``module``'s output, where a bias applies; None if not a biasable layer."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[1])
    weight = getattr(module, "weight", None)
    is_norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")
    if is_norm and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    return None


class BitFitHandle(HookHandle):
    """A BitFit adapter attached to a model: a hook adding ``weight · Δb`` to each module's output."""

    method = NAME

    def __init__(self, name: str, config: dict[str, Any], weight: float):
        super().__init__(name, config, weight)
        self._deltas: dict[str, nn.Parameter] = {}

    def _add(self, path: str, module: nn.Module, delta: nn.Parameter) -> None:
        self._deltas[path] = delta

        def add_bias(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            shift = delta if self._weight == 1.0 else self._weight * delta
            return output + shift.to(output.dtype)

        self.hook(module, add_bias)

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self._deltas.values()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._deltas.values())

    def to_adapter(self) -> Adapter:
        """The adapter as it is now (after training, with the trained deltas)."""
        tensors = {f"base_model.model.{path}.bias": d.detach().cpu().clone() for path, d in self._deltas.items()}
        return Adapter(config=dict(self._config), tensors=tensors)


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> BitFitHandle:
    """Add ``adapter``'s bias deltas (times ``weight``) to the outputs of its modules."""
    check_weight(name, weight)
    plan = []
    for path, params in adapter.modules().items():
        found = find_module(model, path)
        if found is None:
            raise Incompatible(f"bitfit adapter {name!r}: the model has no module {path}")
        module = _innermost(found)
        size = output_size(module)
        if size is None:
            raise Incompatible(
                f"bitfit adapter {name!r}: module {path} is a {type(module).__name__}, not a linear or norm layer"
            )
        delta = params["bias"]
        if tuple(delta.shape) != (size,):
            raise Incompatible(
                f"bitfit adapter {name!r}: {path}.bias has shape {tuple(delta.shape)}, the module outputs {size}"
            )
        plan.append((path, module, delta))
    handle = BitFitHandle(name, dict(adapter.config), weight)
    for path, module, delta in plan:
        device = next(module.parameters()).device
        handle._add(path, module, nn.Parameter(delta.detach().to(device=device, dtype=torch.float32).clone()))
    return handle


def new_adapter(model: nn.Module, *, targets: Sequence[str] | None = None) -> Adapter:
    """A fresh BitFit adapter: zero bias deltas (a no-op until trained).

    ``targets``: leaf names of the modules to give a bias delta (linear layers, GPT-2 Conv1D, norms).
    Default: every such module that already has a bias (classic BitFit); on a model whose layers have none
    (Llama), every linear layer except the output head.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # A layer already wrapped by another adapter's site appears as "<path>.base_layer": address it by its own path.
    candidates = list({p.replace(".base_layer", ""): m for p, m in model.named_modules() if output_size(m) is not None}
                      .items())
    inner = [(p, m) for p, m in candidates if m is not head]
    if targets is not None:
        chosen = [(p, m) for p, m in candidates if p.rsplit(".", 1)[-1] in targets]
        missing = sorted(set(targets) - {p.rsplit(".", 1)[-1] for p, _ in chosen})
        if missing:
            raise Incompatible(f"the model has no linear or norm layer named {', '.join(missing)}")
    else:
        with_bias = [(p, m) for p, m in inner if isinstance(getattr(m, "bias", None), torch.Tensor)]
        chosen = with_bias or [(p, m) for p, m in inner if isinstance(m, (nn.Linear, Conv1D))]
    if not chosen:
        raise Incompatible(f"{type(model).__name__} has no linear or norm layer to give a bias")
    tensors = {f"base_model.model.{p}.bias": torch.zeros(output_size(m)) for p, m in chosen}
    config = {"peft_type": "BITFIT", "target_modules": sorted({p.rsplit(".", 1)[-1] for p, _ in chosen}),
              "base_model_name_or_path": getattr(model, "name_or_path", None)}
    return Adapter(config=config, tensors=tensors)


class BitFit(Method):
    """The hub's own BITFIT format (docs/formats.md): bias deltas added to module outputs by hooks."""

    peft_type = "BITFIT"
    name = NAME
    peft_loadable = False
    not_additive = "BitFit trains biases, not weight matrices"
    params = ("bias",)
    fields = {"target_modules": Modules(regex=False)}
    attachable = True
    stackable = True
    recipes = {"bitfit": {}}
    default_lr = 5e-3
    make = staticmethod(new_adapter)
    notes = "the hub's own format (PEFT has none)"

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        for path, params in self.require_modules(tensors).items():
            if params["bias"].dim() != 1:
                raise InvalidArtifact(f"module {path}: bitfit bias has shape {tuple(params['bias'].shape)}, not 1-D")

    def saved_modules(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return {}  # every "<module>.bias" is a bias delta here, never a module to swap in

    def attach(self, model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> BitFitHandle:
        return attach(model, adapter, name=name, weight=weight)


METHOD = BitFit()
