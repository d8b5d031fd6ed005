"""IA3 as PEFT saves it: one vector ``ia3_l`` per module.

PEFT 0.21.2 (tuners/ia3/layer.py): modules listed in ``feedforward_modules`` scale the layer's input
(``ia3_l`` [1, in]: ``y = base(x ⊙ l)``), the others its output, bias included (``ia3_l`` [out, 1]:
``y = base(x) ⊙ l``). Both act on the frozen base, so they are the site's input/output transforms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter
from hub.formats.peft import KEY_PREFIX
from hub.methods._fresh import base_config
from hub.methods._site import SiteMethod
from hub.methods.base import Need, common_dtype, common_value, only_module_tensors
from hub.methods.config import Bool, Modules
from hub.sites import (
    InputTransform,
    OutputTransform,
    expect_linear,
    expect_shape,
    linear_dims,
    parameter,
    resolve_targets,
    site_device,
    target_modules,
)

# PEFT's defaults for Llama-style models: keys, values and the feed-forward output, whose input is scaled.
DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
DEFAULT_FEEDFORWARD = ("down_proj",)


class IA3Input(InputTransform):
    def __init__(self, vector: torch.Tensor):
        super().__init__()
        self.ia3_l = parameter(vector)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.ia3_l.dtype) * self.ia3_l.flatten()).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        return torch.diag(self.ia3_l.flatten())


class IA3Output(OutputTransform):
    scales_bias = True

    def __init__(self, vector: torch.Tensor):
        super().__init__()
        self.ia3_l = parameter(vector)

    def scale(self) -> torch.Tensor:
        return self.ia3_l.flatten()


def is_feedforward(config: dict[str, Any], path: str) -> bool:
    """PEFT's IA3Model._check_target_module_feedforward."""
    modules = config.get("feedforward_modules") or []
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return path in modules or any(path.endswith(f".{m}") for m in modules)


def build(model: nn.Module, adapter: Adapter) -> dict[str, InputTransform | OutputTransform]:
    config = adapter.config
    deltas: dict[str, InputTransform | OutputTransform] = {}
    for target in resolve_targets(model, adapter):
        path = target.path
        in_features, out_features = expect_linear(target, "IA3")
        vector = target.params["ia3_l"]
        device = site_device(target.module)
        if is_feedforward(config, path):
            expect_shape(path, "ia3_l (feedforward: scales the input)", vector, (1, in_features))
            deltas[path] = IA3Input(vector.to(device))
        else:
            expect_shape(path, "ia3_l (scales the output)", vector, (out_features, 1))
            deltas[path] = IA3Output(vector.to(device))
    if not deltas:
        raise InvalidArtifact("IA3 adapter adapts no module")
    return deltas




def new_adapter(
    model: nn.Module,
    *,
    targets: Sequence[str] | None = None,
    feedforward: Sequence[str] | None = None,
) -> Adapter:
    """A fresh IA3 for ``model`` as PEFT initializes it: every vector one (a no-op). ``feedforward`` modules (a
    subset of ``targets``) scale their input, the others their output. Unset, they are those of
    ``DEFAULT_TARGETS`` / ``DEFAULT_FEEDFORWARD`` the model has."""
    chosen = target_modules(model, targets or DEFAULT_TARGETS, method="IA3", all_required=targets is not None)
    names = {path.rsplit(".", 1)[-1] for path in chosen}
    targets = sorted(names) if targets is None else targets
    feedforward = sorted(names & set(DEFAULT_FEEDFORWARD)) if feedforward is None else feedforward
    if not set(feedforward) <= set(targets):
        raise InvalidArtifact(f"IA3 feedforward modules {sorted(set(feedforward) - set(targets))} are not targets")
    config = base_config(
        model, "IA3", target_modules=sorted(set(targets)), feedforward_modules=sorted(set(feedforward)),
        fan_in_fan_out=False, init_ia3_weights=True,
    )
    tensors: dict[str, torch.Tensor] = {}
    for path, module in chosen.items():
        dims = linear_dims(module)
        if dims is None:
            raise Incompatible(f"IA3 target {path} is a {type(module).__name__}, not a linear layer")
        in_features, out_features = dims
        config["fan_in_fan_out"] = config["fan_in_fan_out"] or isinstance(module, Conv1D)
        shape = (1, in_features) if is_feedforward(config, path) else (out_features, 1)
        tensors[f"{KEY_PREFIX}{path}.ia3_l"] = torch.ones(shape)
    return Adapter(config=config, tensors=tensors)


class IA3(SiteMethod):
    """PEFT's IA3 type (module docstring): vectors scaling a module's input or output."""

    peft_type = "IA3"
    name = "ia3"
    not_additive = "IA3 scales activations: its update multiplies, it does not add a ΔW"
    params = ("ia3_l",)
    fields = {"feedforward_modules": Modules(), "fan_in_fan_out": Bool(), "init_ia3_weights": Bool()}
    summable = True
    mixture_expert = True
    recipes = {"ia3": {}}
    default_lr = 0.1
    make = staticmethod(new_adapter)
    notes = "sums only IA3 adapters of the same modules (a missing vector means 1)"

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        self.require_modules(tensors)

    def needs(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[Need]:
        needs = super().needs(config, shapes)
        for path, params in self.modules(shapes).items():
            vector = params["ia3_l"]
            if len(vector) == 2:
                out, inp = (None, vector[1]) if is_feedforward(dict(config), path) else (vector[0], None)
                shape = (inp, out) if config.get("fan_in_fan_out") else (out, inp)
                needs.append(Need(f"{path}.weight", shape))
        return needs

    def build(self, model: nn.Module, adapter: Adapter) -> dict[str, InputTransform | OutputTransform]:
        return build(model, adapter)

    def weighted_sum(self, adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
        for index, adapter in enumerate(adapters):
            only_module_tensors(adapter, index)
        first = adapters[0]
        layout = {key: tuple(tensor.shape) for key, tensor in first.tensors.items()}
        for index, adapter in enumerate(adapters[1:], start=1):
            other = {key: tuple(tensor.shape) for key, tensor in adapter.tensors.items()}
            if other != layout:
                differing = sorted(set(layout) ^ set(other)) or sorted(k for k in layout if layout[k] != other[k])
                raise Incompatible(
                    f"IA3 adapters #0 and #{index} differ at {differing[0]}: they must scale the same modules with the"
                    " same shapes (a missing IA3 vector means 1, not 0, so the sum would be ambiguous); stack them"
                    " instead"
                )
        common_value(adapters, "task_type")
        dtype = common_dtype(adapters)
        work = torch.promote_types(dtype, torch.float32)
        tensors = {
            key: sum(w * adapter.tensors[key].to(work) for w, adapter in zip(weights, adapters, strict=True)).to(dtype)
            for key in first.tensors
        }
        return Adapter(config={**first.config, "inference_mode": True}, tensors=tensors)


METHOD = IA3()
