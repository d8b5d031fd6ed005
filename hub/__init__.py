"""adapter hub: a versioned registry, composition engine and Hub push/pull for PEFT adapters.

The front door: ``from hub import Hub, compose, activate``. They load on first use, so ``import hub.registry`` (and
every registry command) does not pay for torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hub.client import Hub
    from hub.composition import activate, compose

__all__ = ["Hub", "activate", "compose"]
_HOMES = {"Hub": "hub.client", "activate": "hub.composition", "compose": "hub.composition"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'hub' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
