"""What every method's ``attach`` returns."""

from __future__ import annotations

from typing import Protocol


class Handle(Protocol):
    """One adapter attached to a model. ``detach()`` restores the model exactly as it was before ``attach``."""

    name: str
    method: str

    def detach(self) -> None: ...
