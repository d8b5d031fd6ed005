"""LoftQ initialisation of LoRA on a bitsandbytes base (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware
Quantization", arXiv:2310.08659, Algorithm 1).

QLoRA starts every LoRA at zero on ``Q = q(W)``, so the adapted model starts a whole quantisation error away from
``W``. LoftQ alternates, for ``loftq_iter`` iterations T::

    Q_t = q(W − s·B_{t−1} A_{t−1})            (B_0 A_0 = 0)
    s·B_t A_t = the rank-r truncated SVD of W − Q_t

and trains the LoRA (A_T, B_T) on the base quantised as ``Q_T`` instead of ``q(W)``: the adapted weight
``Q_T + s·B_T A_T`` starts closer to ``W`` than ``q(W)`` does. ``q`` is the layer's own bitsandbytes quantiser
(``quantize_4bit`` with the layer's block size, type and double quantisation, or LLM.int8()'s row-wise int8), run
wherever the layer lives (CPU or GPU); PEFT 0.21.2's ``loftq_init`` runs only on CUDA/XPU and ignores the LoRA
scaling (right only when lora_alpha == r). Here the SVD's product is divided by ``s`` (α/r, rsLoRA α/√r) before it
is split evenly between A and B.

The trained-on base is no longer the folder's: ``initialise`` rewrites each targeted layer in place and writes the
derived base (the folder's files with each targeted weight replaced by ``W − s·B_{T−1} A_{T−1}``, which loading
quantises to exactly ``Q_T``) under ``$HUB_HOME/bases/loftq-<hash>``. The model then carries that folder's
fingerprint, so the adapter is registered on it and is never an exact match for the plain base (docs/formats.md,
"LoftQ").
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hub.config import load_settings
from hub.errors import Incompatible, InvalidArtifact
from hub.fingerprint import Fingerprint, fingerprint_path, weight_files
from hub.sites import is_bnb_4bit, is_bnb_8bit

# loftq_bits -> the bitsandbytes quantisation the base must be loaded with (hub.runtime.load_base's names).
BITS = {4: "nf4", 8: "int8"}
# What a model carries once LoftQ has rewritten it: the derived base folder (hub.client.Hub.train registers on it).
DERIVED_ATTR = "hub_loftq_base"
Quantiser = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LoftQConfig:
    """PEFT's ``LoftQConfig``: ``loftq_bits`` (4: nf4, 8: int8) and ``loftq_iter`` (alternations T >= 1)."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    @classmethod
    def parse(cls, value: Mapping[str, Any] | None) -> LoftQConfig:
        """A config from PEFT's ``loftq_config`` dict (None or {}: the defaults, as PEFT's LoftQConfig()).
        Raises InvalidArtifact naming the first bad key or value."""
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise InvalidArtifact(f"loftq_config must be an object with loftq_bits and loftq_iter, not {value!r}")
        unknown = sorted(set(value) - {"loftq_bits", "loftq_iter"})
        if unknown:
            raise InvalidArtifact(f"unknown loftq_config key {', '.join(map(str, unknown))} (known: loftq_bits,"
                                  " loftq_iter)")
        config = cls(**value)
        if type(config.loftq_bits) is not int or config.loftq_bits not in BITS:
            raise InvalidArtifact(f"loftq_config loftq_bits must be 4 or 8, not {config.loftq_bits!r}")
        if type(config.loftq_iter) is not int or config.loftq_iter < 1:
            raise InvalidArtifact(f"loftq_config loftq_iter must be an integer >= 1, not {config.loftq_iter!r}")
        return config

    def to_dict(self) -> dict[str, int]:
        return {"loftq_bits": self.loftq_bits, "loftq_iter": self.loftq_iter}


@dataclass(frozen=True)
class LoftQFactors:
    """One module's LoftQ result, all [out, in] or factor-shaped, float32, on the weight's device.

    ``source``: ``W − s·B_{T−1} A_{T−1}``, what gets quantised; ``quantized``: ``Q_T = q(source)`` dequantised;
    ``a`` [r, in] and ``b`` [out, r]: lora_A and lora_B, with ``s·b @ a`` the rank-r SVD of ``W − Q_T``."""

    source: torch.Tensor
    quantized: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def check_quantization(model: nn.Module, config: LoftQConfig) -> None:
    """Refuse (Incompatible, one line) a model not quantised as ``config.loftq_bits`` says: LoftQ fits the LoRA to
    the quantisation error of the base the adapter trains on."""
    wanted = BITS[config.loftq_bits]
    found = None
    for module in model.modules():
        if is_bnb_4bit(module):
            found = str(module.weight.quant_type)
            break
        if is_bnb_8bit(module):
            found = "int8"
            break
    if found != wanted:
        have = f"a {found} base" if found else "an unquantized base"
        raise Incompatible(f"init_lora_weights='loftq' with loftq_bits={config.loftq_bits} needs a base loaded as"
                           f" {wanted} (bitsandbytes), not {have}")


def quantiser(layer: nn.Module) -> Quantiser:
    """``w -> q(w)`` dequantised (float32), with exactly the quantisation ``layer`` was loaded with: bitsandbytes'
    own ``quantize_4bit``/``dequantize_4bit`` (the layer's block size, type, double quantisation and source dtype)
    or LLM.int8()'s ``int8_vectorwise_quant`` of the fp16 cast. Runs on the weight's device."""
    import bitsandbytes.functional as bnbf

    if is_bnb_4bit(layer):
        param = layer.weight
        dtype = param.quant_state.dtype

        def q4(weight: torch.Tensor) -> torch.Tensor:
            packed, state = bnbf.quantize_4bit(weight.to(dtype).contiguous(), blocksize=param.blocksize,
                                               compress_statistics=param.compress_statistics,
                                               quant_type=param.quant_type, quant_storage=param.quant_storage)
            return bnbf.dequantize_4bit(packed, state).float()

        return q4
    if is_bnb_8bit(layer):

        def q8(weight: torch.Tensor) -> torch.Tensor:
            cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
            return bnbf.int8_vectorwise_dequant(cb, scb).float()

        return q8
    raise Incompatible(f"LoftQ needs a bitsandbytes layer, not a {type(layer).__name__}")


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, *, rank: int, scale: float, quantise: Quantiser,
                  iterations: int) -> LoftQFactors:
    """Algorithm 1 of the paper for one [out, in] ``weight`` (see the module notes), with the LoRA scaling ``s``
    folded in: ``s·b @ a`` is the rank-``rank`` truncated SVD of ``W − Q_T``, split as ``U√(S/s)`` and
    ``√(S/s)Vᴴ``. Raises InvalidArtifact for rank < 1, iterations < 1 or scale <= 0."""
    if rank < 1 or iterations < 1 or not scale > 0:
        raise InvalidArtifact(f"LoftQ needs rank >= 1, iterations >= 1 and a positive scaling, not rank={rank},"
                              f" iterations={iterations}, scaling={scale}")
    weight = weight.float()
    source = weight
    for step in range(iterations):
        quantized = quantise(source)
        u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        root = (s[:rank] / scale).sqrt()
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
        if step + 1 < iterations:
            source = weight - scale * (b @ a)
    return LoftQFactors(source=source, quantized=quantized, a=a.contiguous(), b=b.contiguous())


def requantise(layer: nn.Module, source: torch.Tensor) -> None:
    """Replace ``layer``'s quantised weight by bitsandbytes' quantisation of ``source`` [out, in], through the same
    parameter classes and settings loading used (so ``base_weight(layer)`` equals ``quantiser(layer)(source)``)."""
    import bitsandbytes as bnb

    device = layer.weight.device
    if is_bnb_4bit(layer):
        old = layer.weight
        new = bnb.nn.Params4bit(source.to(device="cpu", dtype=old.quant_state.dtype), requires_grad=False,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_type=old.quant_type, quant_storage=old.quant_storage, module=layer)
        layer.weight = new.to(device)
    elif is_bnb_8bit(layer):
        layer.weight = bnb.nn.Int8Params(source.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
        # The layer moves CB/SCB into its state on the next forward; stale ones from the old weight must not win.
        layer.state.CB = layer.state.SCB = None
    else:
        raise Incompatible(f"LoftQ needs a bitsandbytes layer, not a {type(layer).__name__}")


def source_folder(model: nn.Module) -> Path:
    """The local folder ``model`` was loaded from (its ``name_or_path``), whose safetensors hold the full-precision
    W that LoftQ fits. Raises Incompatible when there is none, or when the model carries a fingerprint (hub
    ``load_base``) that the folder no longer matches."""
    name = getattr(model, "name_or_path", None)
    path = Path(name).expanduser() if isinstance(name, str) and name else None
    if path is None or not path.is_dir():
        raise Incompatible("init_lora_weights='loftq' reads the base's full-precision weights from the folder it was"
                           f" loaded from, and this {type(model).__name__} records none (name_or_path={name!r}):"
                           " load it from a local folder (hub.runtime.load_base)")
    carried = model.__dict__.get("hub_fingerprint")
    if isinstance(carried, Fingerprint) and fingerprint_path(path).weights_hash != carried.weights_hash:
        raise Incompatible(f"the base folder {path} has changed since the model was loaded from it")
    return path


def initialise(model: nn.Module, layers: Mapping[str, tuple[nn.Module, int, float]],
               config: LoftQConfig) -> tuple[dict[str, LoftQFactors], Path]:
    """LoftQ for every ``{path: (bitsandbytes layer, rank, scaling)}`` of ``model``: fits each layer's factors to
    the full-precision weight read from the model's folder, rewrites the layer to ``Q_T`` in place, and writes the
    derived base (module notes). The model then carries the derived base's fingerprint and name.

    Returns ({path: LoftQFactors}, the derived base folder). Raises Incompatible (a base not quantised as
    ``config`` says, no source folder, a weight missing from it)."""
    check_quantization(model, config)
    folder = source_folder(model)
    files = {}
    for file in weight_files(folder):
        with safe_open(file, framework="pt", device="cpu") as handle:
            files.update(dict.fromkeys(handle.keys(), file))
    results: dict[str, LoftQFactors] = {}
    for path, (layer, rank, scale) in layers.items():
        key = f"{path}.weight"
        if key not in files:
            raise Incompatible(f"LoftQ: {folder} has no tensor {key} (the weight of {path})")
        with safe_open(files[key], framework="pt", device="cpu") as handle:
            weight = handle.get_tensor(key).to(device=layer.weight.device, dtype=torch.float32)
        results[path] = loftq_factors(weight, rank=rank, scale=scale, quantise=quantiser(layer),
                                      iterations=config.loftq_iter)
    # The derived folder holds each source in the dtype it is quantised from, so loading it quantises to exactly
    # Q_T. It is written before the model changes: a failure up to here leaves the model as it was.
    sources = {f"{path}.weight": results[path].source.to(
        device="cpu", dtype=layer.weight.quant_state.dtype if is_bnb_4bit(layer) else torch.float32)
        for path, (layer, _, _) in layers.items()}
    derived = write_base(folder, sources)
    fingerprint = fingerprint_path(derived)
    for path, (layer, _, _) in layers.items():
        requantise(layer, results[path].source)
    model.__dict__["hub_fingerprint"] = fingerprint
    model.__dict__.pop("hub_identity", None)  # hub.runtime.identify's cached answer is the plain base's
    model.__dict__[DERIVED_ATTR] = derived
    model.name_or_path = str(derived)
    if getattr(model, "config", None) is not None:
        model.config._name_or_path = str(derived)
    return results, derived


def derived_base(model: nn.Module) -> Path | None:
    """The derived base folder LoftQ rewrote ``model`` to (``initialise``), or None for a model it never touched."""
    found = model.__dict__.get(DERIVED_ATTR)
    return found if isinstance(found, Path) else None


def write_base(folder: Path, replaced: Mapping[str, torch.Tensor]) -> Path:
    """A copy of the model folder ``folder`` with the tensors ``replaced`` (by name, same shapes), written
    atomically under ``$HUB_HOME/bases/loftq-<first 16 of its weights_hash>`` (content-addressed: the same derived
    weights give the same folder). Returns the folder."""
    root = load_settings().home / "bases"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".loftq-", dir=root))
    try:
        weights = set(weight_files(folder))
        for item in folder.iterdir():
            if item.is_file() and item not in weights:
                shutil.copy2(item, staging / item.name)  # config, tokenizer, shard index
        for file in weights:
            with safe_open(file, framework="pt", device="cpu") as handle:
                names = handle.keys()  # a safetensors handle, not a dict
                tensors = {name: replaced[name] if name in replaced else handle.get_tensor(name) for name in names}
                metadata = handle.metadata()
            save_file({name: t.contiguous() for name, t in tensors.items()}, staging / file.name, metadata=metadata)
        target = root / f"loftq-{fingerprint_path(staging, use_cache=False).weights_hash[:16]}"
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(staging)  # the same derived base is there already
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
