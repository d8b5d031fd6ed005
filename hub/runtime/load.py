"""Load a base model from a local folder or the local Hugging Face cache, optionally quantized with bitsandbytes.

Nothing is downloaded. The fingerprint is taken from the folder's unquantized safetensors before loading and is
carried by the model as ``model.hub_fingerprint``. Quantized bases keep bitsandbytes' differentiable CPU path
(``disable_cpu_repacking``), so training after an evaluation pass keeps its gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hub.errors import Incompatible, NotFound
from hub.fingerprint import Fingerprint, fingerprint_path
from hub.runtime.layers import disable_cpu_repacking

QUANTIZATIONS = (None, "nf4", "int8")


@dataclass
class Base:
    model: nn.Module
    tokenizer: Any | None
    fingerprint: Fingerprint
    path: Path
    quantize: str | None


def local_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A model folder on disk, or the snapshot of a model name already in the local Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if isinstance(name_or_path, str) and not path.exists():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(name_or_path, local_files_only=True))
        except (HFValidationError, LocalEntryNotFoundError, IncompleteSnapshotError):
            pass
    raise NotFound(f"no model folder at {name_or_path!s} and none by that name in the local Hugging Face cache")


def load_base(
    name_or_path: str | os.PathLike[str],
    *,
    quantize: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Base:
    """Load a base model (frozen, eval mode) with its tokenizer and fingerprint.

    ``quantize``: None, ``"nf4"`` (4-bit NormalFloat, double quantization; computes in fp32 on CPU) or ``"int8"``
    (LLM.int8()).
    """
    if quantize not in QUANTIZATIONS:
        raise Incompatible(f"unknown quantization {quantize!r}: use None, 'nf4' or 'int8'")
    path = local_path(name_or_path)
    base_fingerprint = fingerprint_path(path)

    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], AutoModel) if architectures else AutoModel
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    device = torch.device(device)
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
