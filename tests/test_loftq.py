"""LoftQ initialisation (``init_lora_weights="loftq"``): the adapted weight starts closer to the full-precision W
than the quantized base alone, with the LoRA scaling folded in for any alpha; the adapter trains on, and is
registered against, the derived base it was fitted to; bad ``loftq_config`` values are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from peft.utils.loftq_utils import _low_rank_decomposition
from safetensors.torch import load_file
from test_train import char_tokenizer, tiny_llama

from cli.main import HubGroup
from cli.train import train
from hub.client import Hub
from hub.fingerprint import fingerprint
from hub.formats import write_adapter
from hub.formats.peft import KEY_PREFIX
from hub.methods.lora import new_adapter
from hub.runtime import attach, load_base
from hub.sites import base_weight, find_module

TARGETS = ["q_proj", "v_proj"]
GROUP = HubGroup(commands={"train": train})


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a character tokenizer, saved as a model folder (fp32 safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_llama().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def loftq_adapter(folder: Path, quantize: str, *, rank: int, alpha: float, use_rslora: bool = False,
                  iterations: int = 2):
    """(loaded base, W by module path, the plain quantized weight by path, the LoftQ adapter)."""
    loaded = load_base(folder, quantize=quantize)
    originals = load_file(folder / "model.safetensors")
    paths = [p for p, _ in loaded.model.named_modules() if p.endswith(tuple(TARGETS))]
    weights = {p: originals[f"{p}.weight"] for p in paths}
    plain = {p: base_weight(loaded.model.get_submodule(p)).float().clone() for p in paths}
    adapter = new_adapter(loaded.model, rank=rank, alpha=alpha, targets=TARGETS, use_rslora=use_rslora,
                          init_lora_weights="loftq",
                          loftq_config={"loftq_bits": 4 if quantize == "nf4" else 8, "loftq_iter": iterations})
    return loaded, weights, plain, adapter


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_loftq_starts_closer_to_w_than_the_quantized_base_in_every_module(hub_home: Path, tiny_base: Path,
                                                                           quantize: str):
    loaded, weights, plain, adapter = loftq_adapter(tiny_base, quantize, rank=4, alpha=8)
    scale = 8 / 4
    for path, weight in weights.items():
        a = adapter.tensors[f"{KEY_PREFIX}{path}.lora_A.weight"]
        b = adapter.tensors[f"{KEY_PREFIX}{path}.lora_B.weight"]
        quantized = base_weight(loaded.model.get_submodule(path)).float()  # the rewritten base: Q_T
        loftq_error = torch.linalg.norm(weight - (quantized + scale * b @ a))
        plain_error = torch.linalg.norm(weight - plain[path])
        assert loftq_error < 0.9 * plain_error, (path, float(loftq_error), float(plain_error))


@pytest.mark.parametrize(("alpha", "use_rslora"), [(4.0, False), (32.0, False), (3.0, True)])
def test_scaling_is_folded_for_any_alpha(hub_home: Path, tiny_base: Path, alpha: float, use_rslora: bool):
    rank = 4
    loaded, weights, plain, adapter = loftq_adapter(tiny_base, "nf4", rank=rank, alpha=alpha, use_rslora=use_rslora,
                                                    iterations=1)
    scale = alpha / rank**0.5 if use_rslora else alpha / rank
    model = loaded.model
    quantized = {p: base_weight(model.get_submodule(p)).float() for p in weights}
    # With one iteration Q = q(W), and s·B·A must be PEFT's rank-r SVD of W − Q (PEFT's own split, right only
    # for s = 1).
    for path, weight in weights.items():
        assert torch.equal(quantized[path], plain[path])
        peft = _low_rank_decomposition(weight - quantized[path], reduced_rank=rank)
        a = adapter.tensors[f"{KEY_PREFIX}{path}.lora_A.weight"]
        b = adapter.tensors[f"{KEY_PREFIX}{path}.lora_B.weight"]
        torch.testing.assert_close(scale * b @ a, peft["L"] @ peft["R"], rtol=0, atol=1e-6)
    # The adapted model as the runtime runs it: its effective weight is Q + s·B·A, closer to W than Q.
    handle = attach(model, adapter)
    try:
        for path, weight in weights.items():
            site = find_module(model, path)
            with torch.no_grad():
                effective = site(torch.eye(weight.shape[1])).t()
            a = adapter.tensors[f"{KEY_PREFIX}{path}.lora_A.weight"]
            b = adapter.tensors[f"{KEY_PREFIX}{path}.lora_B.weight"]
            torch.testing.assert_close(effective, quantized[path] + scale * b @ a, rtol=1e-5, atol=1e-6)
            assert torch.linalg.norm(weight - effective) < torch.linalg.norm(weight - quantized[path])
    finally:
        handle.detach()


def test_the_derived_base_loads_as_the_base_the_adapter_was_fitted_to(hub_home: Path, tiny_base: Path,
                                                                       tmp_path: Path):
    loaded, weights, plain, adapter = loftq_adapter(tiny_base, "nf4", rank=4, alpha=16)
    derived = Path(adapter.config["base_model_name_or_path"])
    assert derived.parent == hub_home / "bases" and adapter.config["init_lora_weights"] is True
    assert loaded.model.hub_fingerprint == fingerprint(derived) != fingerprint(tiny_base)
    reloaded = load_base(derived, quantize="nf4")
    for path in weights:
        assert torch.equal(base_weight(reloaded.model.get_submodule(path)),
                           base_weight(loaded.model.get_submodule(path)))
    original, copy = load_file(tiny_base / "model.safetensors"), load_file(derived / "model.safetensors")
    assert sorted(original) == sorted(copy)
    assert all(torch.equal(original[k], copy[k]) for k in original if k.removesuffix(".weight") not in weights)
    # PEFT loads the saved adapter onto the reloaded derived base as a plain LoRA (no second LoftQ) and computes
    # what the hub runtime computes on the base LoftQ rewrote.
    write_adapter(adapter, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(reloaded.model, tmp_path / "adapter").eval()
    ids = torch.tensor([[5, 9, 2, 7, 11, 3]])
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
    handle = attach(loaded.model, adapter)
    try:
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    finally:
        handle.detach()


def test_hub_train_with_loftq_registers_on_the_derived_base_with_its_recipe(hub_home: Path, tiny_base: Path):
    config = json.dumps({"loftq_bits": 4, "loftq_iter": 2})
    result = CliRunner().invoke(GROUP, [
        "train", "lq", "--task", "date", "--examples", "16", "--base", str(tiny_base), "--rank", "4", "--alpha", "8",
        "--targets", "q_proj,v_proj", "--option", "init_lora_weights=loftq", "--option", f"loftq_config={config}",
        "--steps", "3", "--batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    hub = Hub()
    version = hub.get("lq@1")
    assert version.recipe["options"] == {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4,
                                                                                       "loftq_iter": 2}}
    derived = next((hub_home / "bases").iterdir())
    assert version.base.weights_hash == fingerprint(derived).weights_hash
    assert version.base.weights_hash != fingerprint(tiny_base).weights_hash
    # The plain base is only a structural match; the derived base the exact one.
    assert [(m.version.ref, m.exact) for m in hub.compatible(tiny_base)] == [("lq@1", False)]
    assert [(m.version.ref, m.exact) for m in hub.compatible(derived)] == [("lq@1", True)]


@pytest.mark.parametrize(
    ("options", "quantize", "message"),
    [
        (['loftq_config={"loftq_bits": 3}'], "nf4", "loftq_config loftq_bits must be 4 or 8, not 3"),
        (['loftq_config={"loftq_iter": 0}'], "nf4", "loftq_config loftq_iter must be an integer >= 1, not 0"),
        (['loftq_config={"loftq_iters": 2}'], "nf4", "unknown loftq_config key loftq_iters"),
        (["loftq_config=4"], "nf4", "loftq_config must be an object"),
        (["init_lora_weights=pissa"], "nf4", "init_lora_weights must be true or 'loftq' for a new LoRA"),
        ([], "none", "init_lora_weights='loftq' with loftq_bits=4 needs a base loaded as nf4"),
        (['loftq_config={"loftq_bits": 8}'], "nf4", "needs a base loaded as int8 (bitsandbytes), not a nf4 base"),
    ],
)
def test_bad_loftq_settings_are_one_line_and_write_nothing(hub_home: Path, tiny_base: Path, options: list[str],
                                                           quantize: str, message: str):
    given = [arg for option in options for arg in ("--option", option)]
    if not any(o.startswith("init_lora_weights") for o in options):
        given += ["--option", "init_lora_weights=loftq"]
    result = CliRunner().invoke(GROUP, ["train", "lq", "--task", "date", "--examples", "8", "--base", str(tiny_base),
                                        "--quantize", quantize, "--steps", "1", "--quiet", *given])
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]  # beside loading bars
    assert result.exit_code == 1 and errors == [result.output.strip().splitlines()[-1]], result.output
    assert errors[0].startswith("error: ") and message in errors[0]
    assert not (hub_home / "bases").exists() and not list(Hub().list())
