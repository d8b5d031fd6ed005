"""IA3 as PEFT saves it: one vector ``ia3_l`` per module.

PEFT 0.21.2 (tuners/ia3/layer.py): modules listed in ``feedforward_modules`` scale the layer's input
(``ia3_l`` [1, in]: ``y = base(x ⊙ l)``), the others its output, bias included (``ia3_l`` [out, 1]:
``y = base(x) ⊙ l``). Both act on the frozen base, so they are the site's input/output transforms.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter
from hub.formats.peft import KEY_PREFIX
from hub.methods._fresh import base_config
from hub.runtime.layers import (
    InputTransform,
    OutputTransform,
    SiteHandle,
    attach_deltas,
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


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> SiteHandle:
    """Attach a PEFT IA3 adapter to ``model``."""
    return attach_deltas(model, build(model, adapter), adapter=adapter, name=name, method="ia3", weight=weight)


def new_adapter(
    model: nn.Module,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    feedforward: Sequence[str] = DEFAULT_FEEDFORWARD,
) -> Adapter:
    """A fresh IA3 for ``model`` as PEFT initializes it: every vector one (a no-op). ``feedforward`` modules (a
    subset of ``targets``) scale their input, the others their output."""
    if not set(feedforward) <= set(targets):
        raise InvalidArtifact(f"IA3 feedforward modules {sorted(set(feedforward) - set(targets))} are not targets")
    config = base_config(
        model, "IA3", target_modules=sorted(set(targets)), feedforward_modules=sorted(set(feedforward)),
        fan_in_fan_out=False, init_ia3_weights=True,
    )
    tensors: dict[str, torch.Tensor] = {}
    for path, module in target_modules(model, targets, method="IA3").items():
        dims = linear_dims(module)
        if dims is None:
            raise Incompatible(f"IA3 target {path} is a {type(module).__name__}, not a linear layer")
        in_features, out_features = dims
        config["fan_in_fan_out"] = config["fan_in_fan_out"] or isinstance(module, Conv1D)
        shape = (1, in_features) if is_feedforward(config, path) else (out_features, 1)
        tensors[f"{KEY_PREFIX}{path}.ia3_l"] = torch.ones(shape)
    return Adapter(config=config, tensors=tensors)
