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
from hub.runtime.identity import BaseCheck, BaseIdentity, check_base, identify
from hub.runtime.load import Base, default_device, load_base, load_tokenizer, place
from hub.sites import AdaptedEmbedding, AdaptedLinear, GateContext, SiteHandle, gate_context

__all__ = [
    "AdaptedEmbedding",
    "AdaptedLinear",
    "AttachedHandle",
    "Base",
    "BaseCheck",
    "BaseIdentity",
    "GateContext",
    "SiteHandle",
    "StackHandle",
    "attach",
    "attached",
    "check_base",
    "check_fingerprint",
    "default_device",
    "dequantize_merged",
    "detach",
    "gate_context",
    "identify",
    "load_base",
    "load_tokenizer",
    "merge_into_base",
    "place",
]
