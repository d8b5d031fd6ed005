"""Base-model identity: ``weights_hash`` (exact) and ``shape_hash`` (structural)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fingerprint:
    """The identity of a base model.

    ``weights_hash``: sha256 over every tensor's name, dtype, shape and bytes in name order (unquantized weights).
    ``shape_hash``: sha256 over names and shapes only; equal shape hashes mean "structurally compatible".
    """

    weights_hash: str
    shape_hash: str
    architecture: str | None = None
    num_parameters: int = 0
