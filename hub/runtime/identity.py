"""Which base a loaded model is: the identity behind the base check of ``attach``/``activate``.

A model the user loaded with plain transformers (fp32, bf16, fp16, bitsandbytes nf4/int8, any ``device_map``)
carries no fingerprint, and a quantized or down-cast one cannot be hashed back to the folder's weights. So
``identify`` works from what the model recorded about where it came from:

1. a fingerprint carried by the model (``hub.runtime.load_base`` sets one; an earlier ``identify`` caches its
   answer on the model);
2. the folder it was loaded from (``name_or_path``; a Hub id is looked up in the local caches at the commit
   transformers recorded, never downloaded): that folder's fingerprint (cached by file stat) counts only after
   every loaded tensor is checked against the folder's: equal after casting to the model's dtype, and for
   bitsandbytes weights (read through bitsandbytes' own dequantization) within the quantization's rounding of
   each block. A folder changed after loading, or another folder with the same shapes, fails this check;
3. otherwise the loaded tensors themselves: their hash when unquantized (exact), only their logical shapes when
   quantized (structural: ``Params4bit`` records the unquantized shape in ``quant_state.shape``).

``check_base`` compares that identity with the base an adapter was registered on and says which check it made.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hub.errors import HubError, Incompatible
from hub.fingerprint import (
    Fingerprint,
    fingerprint_model,
    fingerprint_path,
    saved_state_dict,
    shape_hash_of,
    weight_files,
)
from hub.sites import base_weight, is_bnb_4bit, is_bnb_8bit, is_quantized, quantization_of, sites

log = logging.getLogger(__name__)

IDENTITY_ATTR = "hub_identity"
# Largest distance between a weight and its dequantized value, as a fraction of its block's (4-bit) or row's
# (int8) absolute maximum. NF4 codes are at most 0.304 apart and FP4 codes 0.333, so rounding moves a weight by
# at most half of that, and double quantization of the block maxima adds about 1%; int8 rounds to half of
# 1/127, after the fp16 cast LLM.int8() quantizes from. The bounds leave room for all of it and still refuse
# other weights: two independent initializations differ by more than this in nearly every block.
FOUR_BIT_TOLERANCE = 0.2
INT8_TOLERANCE = 1.0 / 127


@dataclass(frozen=True)
class BaseIdentity:
    """What a loaded model is, as far as can be told.

    ``fingerprint``: the exact identity (its ``weights_hash``) when known, else None (a quantized model whose
    source folder was not found or does not match). ``shape_hash``: always known, from the logical shapes.
    ``how``: one line saying where the identity comes from. ``source``: the folder it was checked against.
    """

    fingerprint: Fingerprint | None
    shape_hash: str
    how: str
    source: Path | None = None
    architecture: str | None = None


@dataclass(frozen=True)
class BaseCheck:
    """The outcome of a passed base check: ``match`` is ``"exact"`` (same weights as the adapter's base) or
    ``"structural"`` (same shapes only, allowed by ``allow_structural``)."""

    match: str
    identity: BaseIdentity

    def __str__(self) -> str:
        return f"base check: {self.match} match ({self.identity.how})"


def identify(model: nn.Module, *, cache_dir: Path | None = None) -> BaseIdentity:
    """The identity of ``model`` (see the module notes), cached on the model for the next call.

    Raises Incompatible for a model that already has adapters attached and no identity yet (its tensors are no
    longer the base's alone).
    """
    known = model.__dict__.get(IDENTITY_ATTR)
    if isinstance(known, BaseIdentity):
        return known
    carried = model.__dict__.get("hub_fingerprint")
    if isinstance(carried, Fingerprint):
        identity = BaseIdentity(carried, carried.shape_hash, "fingerprint carried by the model (hub load_base)",
                                architecture=carried.architecture)
    else:
        if sites(model):
            raise Incompatible("cannot identify a model that already has adapters attached: detach them first, or"
                               " load it with hub.runtime.load_base")
        identity = _identify_loaded(model, cache_dir)
    model.__dict__[IDENTITY_ATTR] = identity
    return identity


def check_base(model: nn.Module, expected: Fingerprint, *, allow_structural: bool = False) -> BaseCheck:
    """Check that ``model`` is the base ``expected`` describes; returns which check passed (also logged).

    Raises Incompatible when the shapes differ, or when only the shapes match and ``allow_structural`` is False
    (the message says how to force it).
    """
    identity = identify(model)
    if identity.fingerprint is not None and identity.fingerprint.weights_hash == expected.weights_hash:
        result = BaseCheck("exact", identity)
    elif identity.shape_hash == expected.shape_hash:
        if not allow_structural:
            raise Incompatible(
                f"adapter was trained on base {expected.weights_hash[:12]} ({expected.architecture}); this model"
                " has the same shapes, different weights; pass allow_structural=True (CLI: --allow-structural) to"
                f" attach it anyway ({identity.how})"
            )
        result = BaseCheck("structural", identity)
    else:
        raise Incompatible(
            f"adapter was trained on base {expected.weights_hash[:12]} ({expected.architecture}); this"
            f" {identity.architecture or type(model).__name__} has different shapes (or tensor names)"
        )
    log.info("%s", result)
    return result


def _identify_loaded(model: nn.Module, cache_dir: Path | None) -> BaseIdentity:
    quantized = quantization_of(model)
    # Unquantized: exactly the tensors save_pretrained writes (names converted back to the checkpoint's).
    logical = logical_tensors(model) if quantized else saved_state_dict(model)
    shape_hash = shape_hash_of((name, _logical_shape(tensor)) for name, tensor in logical.items())
    architecture = type(model).__name__
    loaded_as = f"{quantized} (bitsandbytes)" if quantized else str(_main_dtype(logical)).removeprefix("torch.")
    reason = "no source folder found"
    source = source_folder(model, cache_dir)
    if source is not None:
        try:
            folder = fingerprint_path(source, cache_dir=cache_dir)
        except HubError as exc:
            folder, reason = None, f"its source {source} cannot be fingerprinted: {exc}"
        if folder is not None:
            if folder.shape_hash != shape_hash:
                reason = f"its source {source} now has other shapes"
            else:
                mismatch = _first_mismatch(model, logical, source)
                if mismatch is None:
                    how = f"folder {source}, checked against the {loaded_as} weights loaded from it"
                    return BaseIdentity(folder, shape_hash, how, source, folder.architecture or architecture)
                reason = f"its source {source} has other weights than the loaded model ({mismatch})"
    if quantized:
        return BaseIdentity(None, shape_hash, f"shapes of the {loaded_as} weights only: {reason}",
                            architecture=architecture)
    loaded = fingerprint_model(model)
    return BaseIdentity(loaded, shape_hash, f"hash of the {loaded_as} weights as loaded; {reason}",
                        architecture=architecture)


def source_folder(model: nn.Module, cache_dir: Path | None = None) -> Path | None:
    """The local folder ``model`` was loaded from, by what transformers recorded (``name_or_path``, and for a Hub
    id the commit, ``config._commit_hash``); None when it recorded nothing usable. Never downloads."""
    from hub.snapshots import cached_snapshot, parse_model_id, probe

    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    path = Path(name).expanduser()
    if probe(path):
        return path if path.is_dir() else None
    parsed = parse_model_id(name)
    if parsed is None:
        return None
    from hub.config import load_settings

    repo_id, revision = parsed
    commit = getattr(config, "_commit_hash", None) or revision
    hf_cache = (Path(cache_dir) if cache_dir is not None else load_settings().cache_dir) / "hf"
    return cached_snapshot(repo_id, commit, hf_cache)


def logical_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write for an unquantized copy of a quantized ``model``, by name:
    parameters and persistent buffers, tied weights once; each quantized weight as its bitsandbytes parameter
    (``_logical_shape`` gives its unquantized shape). Checkpoint name conversions (fused MoE experts) are not
    undone: such models get a structural identity that does not match their folder."""
    state: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            state[prefix + name] = param
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[prefix + name] = buffer
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        for key in model._keys_to_ignore_on_save or ():
            state.pop(key, None)
        return remove_tied_weights_from_state_dict(state, model)
    kept: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name in sorted(state):  # a plain module: a tensor under two names (tied) counts once
        if id(state[name]) not in seen:
            seen.add(id(state[name]))
            kept[name] = state[name]
    return kept


def _logical_shape(tensor: torch.Tensor) -> list[int]:
    quant_state = getattr(tensor, "quant_state", None)  # Params4bit: packed storage, logical shape recorded
    shape = getattr(quant_state, "shape", None)
    return list(shape if shape is not None else tensor.shape)


def _main_dtype(logical: dict[str, torch.Tensor]) -> torch.dtype:
    floats = [t.dtype for t in logical.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _first_mismatch(model: nn.Module, logical: dict[str, torch.Tensor], folder: Path) -> str | None:
    """The first tensor (by name) whose loaded value does not come from ``folder``'s, or None when all do.
    Streams one tensor at a time from the safetensors files."""
    from safetensors import safe_open

    owners = _quantized_owners(model)
    remaining = set(logical)
    for file in weight_files(folder):
        with safe_open(file, framework="pt", device="cpu") as handle:
            for name in sorted(handle.keys()):
                loaded = logical.get(name)
                if loaded is None:
                    return f"{name} is not in the model"
                remaining.discard(name)
                if loaded.device.type == "meta":
                    return f"{name} is offloaded, so its values cannot be read"
                stored = handle.get_tensor(name)
                if not _agrees(loaded, stored, owners.get(name)):
                    return f"{name} differs"
    return f"{sorted(remaining)[0]} is not in the folder" if remaining else None


def _quantized_owners(model: nn.Module) -> dict[str, nn.Module]:
    """``{"...q_proj.weight": the bitsandbytes layer}`` for every quantized weight."""
    return {f"{name}.weight": module for name, module in model.named_modules() if is_quantized(module)}


@torch.no_grad()
def _agrees(loaded: torch.Tensor, stored: torch.Tensor, layer: nn.Module | None) -> bool:
    """Whether ``loaded`` is what loading ``stored`` gives: the same values after the cast to the loaded dtype,
    or for a quantized weight, within the rounding of its quantization."""
    if layer is None:
        if list(loaded.shape) != list(stored.shape):
            return False
        return torch.equal(loaded.detach(), stored.to(device=loaded.device, dtype=loaded.dtype))
    weight = base_weight(layer).float()  # bitsandbytes' own dequantization, whatever the packing
    stored = stored.to(device=weight.device, dtype=torch.float32)
    if weight.shape != stored.shape:
        return False
    if is_bnb_4bit(layer):  # one row per quantization block (zero padding agrees with itself)
        blocksize = int(layer.weight.quant_state.blocksize)
        weight, stored = _blocks(weight, blocksize), _blocks(stored, blocksize)
        tolerance = FOUR_BIT_TOLERANCE
    elif is_bnb_8bit(layer):  # LLM.int8() scales each row by its absolute maximum
        tolerance = INT8_TOLERANCE
    else:  # pragma: no cover - is_quantized covers exactly the two kinds above
        raise AssertionError(type(layer).__name__)
    # Every weight within the tolerance of its block's absolute maximum, compared block by block: two reductions
    # instead of an elementwise bound (the check runs over every weight of a model once).
    error = (weight - stored).abs_().amax(dim=1)
    return bool((error <= tolerance * stored.abs().amax(dim=1) + 1e-6).all())


def _blocks(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """``tensor`` flattened into rows of ``size`` elements, the last one padded with zeros."""
    flat = tensor.flatten()
    pad = (-flat.numel()) % size
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, size)
