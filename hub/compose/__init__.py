"""Compositions of adapters: weighted sums merged into one adapter, stacks, gated mixtures, and the front door.

``from hub import compose`` gives this package, which is also callable as ``hub.compose.compose``:

>>> from hub import compose
>>> merged = compose(["math@2", "code"], weights=[0.7, 0.3])
"""

import sys
import types
from typing import Any

from hub.compose.api import Active, Composition, activate, compose
from hub.compose.members import Member
from hub.compose.mixture import FitResult, Mixture, MixtureHandle
from hub.compose.router import RouterConfig
from hub.compose.stack import Stack
from hub.compose.weighted import WeightedSum

__all__ = [
    "Active",
    "Composition",
    "FitResult",
    "Member",
    "Mixture",
    "MixtureHandle",
    "RouterConfig",
    "Stack",
    "WeightedSum",
    "activate",
    "compose",
]


class _CallableModule(types.ModuleType):
    """Lets ``from hub import compose; compose([...])`` call the function while ``hub.compose.merge`` and the other
    submodules stay importable: binding the function over the package name in ``hub/__init__.py`` would hide them,
    and importing it there would load torch for every registry command."""

    def __call__(self, *args: Any, **kwargs: Any) -> Composition:
        return compose(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
