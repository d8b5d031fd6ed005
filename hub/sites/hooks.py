"""Adapters attached by forward hooks rather than at adapted sites (BitFit's bias deltas, bottleneck blocks): one
handle base for their weight, their hooks and detaching."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hub.errors import Incompatible, NotFound


def check_weight(name: str, weight: float) -> float:
    """An attach weight as a float. Raises Incompatible for anything but a finite number."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise Incompatible(f"adapter {name!r}: weight must be a finite number, got {weight!r}")
    return float(weight)


class HookHandle:
    """An adapter whose effect is forward hooks on the model's modules. ``weight`` scales what the hooks add;
    ``detach()`` removes every hook, restoring the model."""

    method: str

    def __init__(self, name: str, config: dict[str, Any], weight: float):
        self.name = name
        self._config = config
        self._weight = check_weight(name, weight)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.attached = True

    def hook(self, module: nn.Module, function: Callable[[nn.Module, tuple, Any], Any]) -> None:
        """Run ``function(module, args, output)`` after ``module``'s forward, its result replacing the output."""
        self._hooks.append(module.register_forward_hook(function))

    def set_weight(self, weight: float) -> None:
        self._weight = check_weight(self.name, weight)

    def detach(self) -> None:
        if not self.attached:
            raise NotFound(f"adapter {self.name!r} is not attached")
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.attached = False
