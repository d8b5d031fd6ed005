"""One normalized description of an adapter, whatever method produced it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# PEFT's peft_type → the hub's method name. BITFIT and BOTTLENECK are the hub's own formats (PEFT has none), and
# so are the compositions HUB_STACK and HUB_MIXTURE (hub.formats.composition); docs/formats.md describes them.
PEFT_TYPES: dict[str, str] = {
    "LORA": "lora",
    "ADALORA": "adalora",
    "LOHA": "loha",
    "LOKR": "lokr",
    "IA3": "ia3",
    "PROMPT_TUNING": "prompt_tuning",
    "PREFIX_TUNING": "prefix_tuning",
    "P_TUNING": "p_tuning",
    "LN_TUNING": "ln_tuning",
    "OFT": "oft",
    "BOFT": "boft",
    "BITFIT": "bitfit",
    "BOTTLENECK": "bottleneck",
    "HUB_STACK": "stack",
    "HUB_MIXTURE": "mixture",
}
METHOD_TO_PEFT_TYPE = {method: peft_type for peft_type, method in PEFT_TYPES.items()}

# Methods whose weights live in per-module tensors (as opposed to a prompt or prefix).
PROMPT_METHODS = frozenset({"prompt_tuning", "prefix_tuning", "p_tuning"})
# Artifacts that name other adapters (by digest) instead of adapting modules themselves.
COMPOSITION_METHODS = frozenset({"stack", "mixture"})

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
    without one.
    """

    method: str
    rank: int | None
    alpha: float | None
    targets: tuple[str, ...]
    base_model: str | None
    options: dict[str, Any] = field(default_factory=dict)


def pattern_value(patterns: dict[str, Any] | None, module_name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
