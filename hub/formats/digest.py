"""The canonical digest of an adapter: its address in the store and its identity in the registry.

sha256 over the normalized config (volatile keys dropped, sets sorted, canonical JSON) followed by every tensor's
name, dtype, shape and bytes in name order. Key order, safetensors metadata and where it was saved from do not
change it; any weight or behaviour-relevant config value does.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from hub.formats.peft import Adapter
from hub.formats.spec import VOLATILE_CONFIG_KEYS

if TYPE_CHECKING:
    import torch


# Config keys PEFT holds as sets and saves as lists in set iteration order, which changes with PYTHONHASHSEED.
SET_CONFIG_KEYS = ("target_modules", "exclude_modules", "feedforward_modules")


def canonical_config(config: dict[str, Any]) -> dict[str, Any]:
    canonical = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    for key in SET_CONFIG_KEYS:
        if isinstance(canonical.get(key), list):
            canonical[key] = sorted(canonical[key], key=str)
    return canonical


def update_with_tensor(hasher: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed one tensor (name, dtype, shape, raw bytes) into a hash; shared with base fingerprints."""
    import torch  # here, not at module level: registry-only commands never load torch

    tensor = tensor.detach().contiguous().cpu()
    header = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])
    hasher.update(header.encode())
    hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def adapter_digest(adapter: Adapter) -> str:
    hasher = hashlib.sha256()
    hasher.update(json.dumps(canonical_config(adapter.config), sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(adapter.tensors):
        update_with_tensor(hasher, name, adapter.tensors[name])
    return hasher.hexdigest()
