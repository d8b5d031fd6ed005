"""Adapter artifacts: PEFT-format read/write, the normalized spec, the canonical digest."""

from hub.formats.digest import adapter_digest, canonical_config
from hub.formats.peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    export_adapter,
    read_adapter,
    validate,
    write_adapter,
)
from hub.formats.spec import AdapterSpec, pattern_value

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Adapter",
    "AdapterSpec",
    "adapter_digest",
    "canonical_config",
    "export_adapter",
    "pattern_value",
    "read_adapter",
    "validate",
    "write_adapter",
]
