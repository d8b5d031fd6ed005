"""Runtime: pretrained bases made available locally, loading them, attaching compositions to a model."""

from hub.runtime.attach import (
    AttachedHandle,
    StackHandle,
    attach,
    attached,
    check_fingerprint,
    dequantize_merged,
    detach,
    merge_into_base,
)
from hub.runtime.layers import AdaptedEmbedding, AdaptedLinear, GateContext, SiteHandle, gate_context
from hub.runtime.load import Base, load_base, load_tokenizer

__all__ = [
    "AdaptedEmbedding",
    "AdaptedLinear",
    "AttachedHandle",
    "Base",
    "GateContext",
    "SiteHandle",
    "StackHandle",
    "attach",
    "attached",
    "check_fingerprint",
    "dequantize_merged",
    "detach",
    "gate_context",
    "load_base",
    "load_tokenizer",
    "merge_into_base",
]
