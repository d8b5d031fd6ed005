"""Load a base model from a local folder or a Hub model id, optionally quantized with bitsandbytes, on any device.

A Hub id (``ORG/NAME[@REVISION]``) is downloaded into HUB_HOME's cache first (``hub.snapshots``). The fingerprint
is taken from the folder's unquantized safetensors before loading and is carried by the model as
``model.hub_fingerprint``. Quantized bases keep bitsandbytes' differentiable CPU path
(``disable_cpu_repacking``), so training after an evaluation pass keeps its gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hub.errors import Incompatible, InvalidArtifact
from hub.fingerprint import Fingerprint, fingerprint_path
from hub.sites import disable_cpu_repacking
from hub.snapshots import model_files

QUANTIZATIONS = (None, "nf4", "int8")


@dataclass
class Base:
    model: nn.Module
    tokenizer: Any | None
    fingerprint: Fingerprint
    path: Path
    quantize: str | None


def local_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A model folder: ``name_or_path`` itself, or the snapshot of a Hub model id ``ORG/NAME[@REVISION]``
    (downloaded into HUB_HOME's cache when not there yet). Raises NotFound, InvalidArtifact (a file, not a
    folder), PermissionDenied, RemoteError."""
    path = model_files(name_or_path)
    if not path.is_dir():
        raise InvalidArtifact(f"{path} is not a model folder (config.json and safetensors weights)")
    return path


def default_device() -> torch.device:
    """The best device available: the first CUDA GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(
    name_or_path: str | os.PathLike[str],
    *,
    quantize: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> Base:
    """Load a base model (frozen, eval mode) with its tokenizer and fingerprint.

    ``name_or_path``: a folder or a Hub model id (see ``local_path``). ``quantize``: None, ``"nf4"`` (4-bit
    NormalFloat, double quantization; computes in fp32 on CPU) or ``"int8"`` (LLM.int8()). ``device``: where the
    model goes (default ``default_device()``: CUDA when available, else the CPU). Raises Incompatible (unknown
    quantization, bitsandbytes missing), NotFound, InvalidArtifact, PermissionDenied, RemoteError.
    """
    if quantize not in QUANTIZATIONS:
        raise Incompatible(f"unknown quantization {quantize!r}: use None, 'nf4' or 'int8'")
    device = torch.device(device) if device is not None else default_device()
    path = local_path(name_or_path)
    base_fingerprint = fingerprint_path(path)

    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], AutoModel) if architectures else AutoModel
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if quantize is not None:
        kwargs["quantization_config"] = _bnb_config(quantize, dtype=dtype, device=device)
        kwargs["device_map"] = {"": device}
    model = model_class.from_pretrained(path, **kwargs)
    if quantize is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    disable_cpu_repacking(model)
    model.hub_fingerprint = base_fingerprint
    return Base(model=model, tokenizer=load_tokenizer(path), fingerprint=base_fingerprint, path=path, quantize=quantize)


def _bnb_config(quantize: str, *, dtype: torch.dtype, device: torch.device) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Incompatible(f"quantize={quantize!r} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # On CPU bitsandbytes computes 4-bit layers in fp32 (fast and exact there); elsewhere in the model's dtype.
    compute = torch.float32 if device.type == "cpu" else dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def load_tokenizer(path: str | os.PathLike[str]) -> Any | None:
    """The tokenizer saved in a model folder, or None when it has none (weights-only folders such as tiny test
    models). Cheap next to loading the model: callers can read and check data with it first."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None  # a weights-only folder (tiny test models) has no tokenizer


def place(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """Put ``model`` on ``device`` (None: leave it where it is) and return the device its inputs go to: that of
    its input embeddings, the first stage of a ``device_map`` placement.

    Raises Incompatible for a model spread over several devices by its ``device_map`` (it cannot move as a
    whole) or a bitsandbytes model that cannot be moved: load it on the device wanted instead.
    """
    if device is not None:
        wanted = torch.device(device)
        if wanted.type == "cuda" and wanted.index is None:
            wanted = torch.device("cuda", torch.cuda.current_device())
        devices = {p.device for p in model.parameters()}
        if devices != {wanted}:
            if len(devices) > 1:
                spread = ", ".join(sorted(str(d) for d in devices))
                raise Incompatible(f"the model is spread over {spread} by its device_map: leave the device unset")
            try:
                model.to(wanted)
            except ValueError as exc:  # transformers refuses to move 8-bit bitsandbytes models
                raise Incompatible(f"cannot move this model to {wanted} ({str(exc).splitlines()[0]}): load it"
                                   f" with device_map={{'': '{wanted}'}}") from None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device
