"""One normalized description of an adapter, whatever method produced it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hub.methods.table import COMPOSITIONS, RUNNABLE, STORED

# The hub's method name → its PEFT type, for every method of the table (hub.methods.table) and the compositions
# HUB_STACK and HUB_MIXTURE (hub.formats.composition; docs/formats.md describes them and the hub's own BITFIT and
# BOTTLENECK).
METHOD_TO_PEFT_TYPE: dict[str, str] = {
    **{peft_type.lower(): peft_type for peft_type in (*RUNNABLE, *STORED)},
    **{method: peft_type for peft_type, method in COMPOSITIONS.items()},
}
# Artifacts that name other adapters (by digest) instead of adapting modules themselves.
COMPOSITION_METHODS = frozenset(COMPOSITIONS.values())

# Config keys that describe where or how an artifact was saved, not what it computes: left out of the digest.
VOLATILE_CONFIG_KEYS = frozenset(
    {"peft_version", "base_model_name_or_path", "inference_mode", "revision", "auto_mapping"}
)


@dataclass(frozen=True)
class AdapterSpec:
    """What the registry indexes about an adapter.

    ``targets`` are the leaf names of the modules that carry tensors (``q_proj``, ``v_proj``), read from the
    tensors themselves, so a regex ``target_modules`` in the config still gives a concrete list.
    ``rank`` is the largest rank used anywhere (``r`` or the maximum of ``rank_pattern``); ``None`` for methods
    without one. ``method`` is the method's name, a variant that users think of as a method of its own included
    (LoRA with ``use_dora`` is ``dora``); ``variants`` the other variants and initializations (``rslora``,
    ``pissa``...).
    """

    method: str
    rank: int | None
    alpha: float | None
    targets: tuple[str, ...]
    base_model: str | None
    options: dict[str, Any] = field(default_factory=dict)
    variants: tuple[str, ...] = ()


def pattern_value(patterns: dict[str, Any] | None, module_name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
