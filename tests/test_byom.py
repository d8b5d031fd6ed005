"""Bring your own model: adapters registered against a folder run, mix and train on that base loaded by plain
transformers (fp32, bf16, nf4) exactly as on the hub-loaded base and as PEFT runs them; other weights with the same
shapes are refused unless forced; a base named by Hub id is downloaded once; every command that runs a model takes
--device."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from peft import PeftModel
from test_train import char_tokenizer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

from hub.client import Hub
from hub.composition import activate, compose
from hub.data import Example
from hub.errors import Incompatible
from hub.evaluate import evaluate
from hub.runtime import attach, identify, load_base
from hub.train import Recipe, train

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = torch.tensor([[3, 17, 42, 5, 99, 7, 64, 12], [8, 8, 21, 77, 3, 40, 2, 91]])
# load_base's nf4: double quantization, fp32 compute on CPU. A user who loads with the same settings gets the same
# quantized weights, so the hub-loaded and the user-loaded paths must agree to float rounding.
HUB_NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
               bnb_4bit_compute_dtype=torch.float32)
# The user-loaded and the hub-loaded base are the same model: every result agrees to 1e-4 whatever the dtype.
SAME = 1e-4
# Against PEFT: fp32 and nf4 (dequantized and computed in fp32) agree to rounding; in bf16, which rounds each
# activation to 8 bits of mantissa, PEFT adds its LoRA branch in another order than the hub (2^-8 relative).
PEFT_TOLERANCE = {"fp32": 1e-4, "nf4": 1e-4, "bf16": 1e-2}
EXAMPLES = [Example(prompt=f"q{i} ", completion=f"answer {i % 3}") for i in range(6)]


def save_base(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def make_lora(base_dir: Path, folder: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config).save_pretrained(folder)
    return folder


def user_model(folder: Path, mode: str, **bnb) -> torch.nn.Module:
    """The base as a user loads it with plain transformers."""
    if mode in ("nf4", "int8"):
        config = BitsAndBytesConfig(**(bnb or (HUB_NF4 if mode == "nf4" else {"load_in_8bit": True})))
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config).eval()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def hub_model(folder: Path, mode: str) -> torch.nn.Module:
    return load_base(folder, quantize="nf4" if mode == "nf4" else None, device="cpu",
                     dtype=torch.bfloat16 if mode == "bf16" else torch.float32).model


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(TOKENS).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor, what: str = "") -> float:
    diff = float((a - b).abs().max())
    print(f"max |logits difference| {what}: {diff:.2e}")
    return diff


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base folder, LoRAs a and b registered against it, and a hub."""
    root = tmp_path_factory.mktemp("byom")
    base_dir = save_base(root / "base", seed=0)
    hub = Hub(home=root / "home")
    folders = {name: make_lora(base_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))}
    for name, folder in folders.items():
        hub.register(folder, name=name, base=base_dir)
    return hub, base_dir, folders


@pytest.mark.parametrize("mode", ["fp32", "bf16", "nf4"])
def test_activate_compose_mix_train_and_evaluate_on_a_user_loaded_base(setup, mode, caplog):
    hub, base_dir, folders = setup
    mine, theirs = user_model(base_dir, mode), hub_model(base_dir, mode)
    tolerance = PEFT_TOLERANCE[mode]

    with caplog.at_level(logging.INFO, logger="hub.runtime.identity"):
        handle = activate(mine, "a", hub=hub)
    assert handle.base_check.match == "exact" and handle.base_check.identity.source == base_dir
    assert "base check: exact" in caplog.text and str(base_dir) in caplog.text
    on_mine = logits(mine)
    theirs_handle = activate(theirs, "a", hub=hub)
    assert max_diff(on_mine, logits(theirs), f"{mode} activate vs hub-loaded") <= SAME
    peft = PeftModel.from_pretrained(user_model(base_dir, mode), folders["a"]).eval()
    assert max_diff(on_mine, logits(peft), f"{mode} activate vs PEFT") <= tolerance
    scores_mine = evaluate(mine, char_tokenizer(), EXAMPLES, generate=False, progress=False)
    scores_theirs = evaluate(theirs, char_tokenizer(), EXAMPLES, generate=False, progress=False)
    assert abs(scores_mine.loss - scores_theirs.loss) <= SAME
    handle.detach()
    theirs_handle.detach()

    weighted = compose(["a", "b"], [0.7, 0.3], hub=hub)
    on_mine, on_theirs = _with(mine, weighted.attach), _with(theirs, weighted.attach)
    assert max_diff(on_mine, on_theirs, f"{mode} weighted sum vs hub-loaded") <= SAME
    peft = PeftModel.from_pretrained(user_model(base_dir, mode), folders["a"], adapter_name="a").eval()
    peft.load_adapter(folders["b"], adapter_name="b")
    peft.add_weighted_adapter(["a", "b"], [0.7, 0.3], "sum", combination_type="cat")
    peft.set_adapter("sum")
    assert max_diff(on_mine, logits(peft), f"{mode} weighted sum vs PEFT cat") <= tolerance

    mixture = compose(["a", "b"], kind="mixture", hub=hub)
    fitted = mixture.fit(mine, char_tokenizer(), EXAMPLES, steps=3, lr=0.05, batch_size=3, progress=False)
    twin = compose(["a", "b"], kind="mixture", hub=hub)
    fitted_twin = twin.fit(theirs, char_tokenizer(), EXAMPLES, steps=3, lr=0.05, batch_size=3, progress=False)
    assert max(abs(x - y) for x, y in zip(fitted.losses, fitted_twin.losses, strict=True)) <= SAME
    mixed = max_diff(_with(mine, mixture.attach), _with(theirs, mixture.attach), f"{mode} mixture vs hub-loaded")
    assert mixed <= SAME

    recipe = Recipe(steps=3, batch_size=4, lr=2e-2)
    trained, trained_twin = (train(m, char_tokenizer(), EXAMPLES, recipe, progress=False) for m in (mine, theirs))
    assert max(abs(x - y) for x, y in zip(trained.losses, trained_twin.losses, strict=True)) <= SAME
    on_mine = _with(mine, lambda model: attach(model, trained.adapter))
    assert max_diff(on_mine, _with(theirs, lambda model: attach(model, trained_twin.adapter)),
                    f"{mode} trained on it vs on hub-loaded") <= SAME


def _with(model, put_on) -> torch.Tensor:
    handle = put_on(model)
    try:
        return logits(model)
    finally:
        handle.detach()


@pytest.mark.parametrize("mode", ["fp32", "bf16", "nf4", "int8"])
def test_other_weights_with_the_same_shapes_are_refused_unless_forced(setup, tmp_path, mode):
    hub, _, _ = setup
    other = user_model(save_base(tmp_path / "other", seed=7), mode)
    with pytest.raises(Incompatible, match=r"same shapes, different weights; pass allow_structural=True \(CLI: "
                                            r"--allow-structural\) to attach it anyway"):
        activate(other, "a", hub=hub)
    handle = activate(other, "a", hub=hub, allow_structural=True)
    assert handle.base_check.match == "structural"
    handle.detach()
    with pytest.raises(Incompatible, match="same shapes, different weights"):
        compose(["a", "b"], [0.5, 0.5], hub=hub).attach(other)
    compose(["a", "b"], kind="mixture", hub=hub).attach(other, allow_structural=True).detach()


@pytest.mark.parametrize("mode", ["fp32", "nf4"])
def test_a_folder_changed_after_loading_does_not_vouch_for_the_model(setup, tmp_path, mode):
    """The model holds seed-7 weights; its folder is then overwritten with the adapters' base. The folder's
    fingerprint now matches the adapters', but the loaded weights do not come from it."""
    hub, base_dir, _ = setup
    folder = save_base(tmp_path / "moving", seed=7)
    model = user_model(folder, mode)
    # A new file renamed over the old one, as tools that write atomically do (writing into the old file would
    # change the memory-mapped weights of the loaded fp32 model too).
    shutil.copy(base_dir / "model.safetensors", folder / "new.tmp")
    (folder / "new.tmp").replace(folder / "model.safetensors")
    with pytest.raises(Incompatible, match="other weights than the loaded model"):
        activate(model, "a", hub=hub)


def test_the_model_keeps_its_identity_and_a_known_folder_is_not_rehashed(setup, monkeypatch):
    hub, base_dir, _ = setup
    model = user_model(base_dir, "nf4", load_in_4bit=True, bnb_4bit_quant_type="nf4")  # the issue's settings
    first = identify(model)
    assert first.fingerprint == hub.fingerprint(base_dir) and "nf4 (bitsandbytes)" in first.how
    import hub.fingerprint as fingerprint_module

    monkeypatch.setattr(fingerprint_module, "_hash_files", lambda *a, **k: pytest.fail("rehashed a cached folder"))
    assert identify(user_model(base_dir, "nf4")).fingerprint == first.fingerprint  # stat cache hit
    handle = activate(model, "a", hub=hub)
    assert handle.base_check.identity is first
    handle.detach()


def test_int8_and_fp16_loads_are_identified_by_their_folder(setup):
    _, base_dir, _ = setup
    int8 = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    fp16 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
    for model in (int8, fp16):
        identity = identify(model)
        assert identity.source == base_dir and identity.fingerprint is not None


def test_without_a_source_folder_an_unquantized_model_is_hashed_and_a_quantized_one_is_structural(setup, tmp_path):
    hub, base_dir, _ = setup
    copy = tmp_path / "copy"
    shutil.copytree(base_dir, copy)
    fp32, nf4 = user_model(copy, "fp32"), user_model(copy, "nf4")
    shutil.rmtree(copy)
    assert identify(fp32).fingerprint == hub.fingerprint(base_dir)  # the loaded fp32 weights hash like the folder
    assert activate(fp32, "a", hub=hub).base_check.match == "exact"
    structural = identify(nf4)
    assert structural.fingerprint is None and structural.shape_hash == hub.fingerprint(base_dir).shape_hash
    assert "no source folder found" in structural.how
    with pytest.raises(Incompatible, match="allow_structural"):
        activate(nf4, "a", hub=hub)


def test_a_model_with_offloaded_layers_is_refused_in_one_line(setup, tmp_path):
    """accelerate offloads layers (to disk here) as meta tensors swapped in around each forward; an adapter there
    computed NaN. PEFT cannot even load onto such a model."""
    from hub.runtime import attached

    hub, base_dir, _ = setup
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                 "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(base_dir, device_map=placement, offload_folder=tmp_path).eval()
    for attempt in (lambda: activate(model, "a", hub=hub, allow_structural=True),
                    lambda: train(model, char_tokenizer(), EXAMPLES, Recipe(steps=1), progress=False)):
        with pytest.raises(Incompatible, match=r"model.layers.1.\S+ is offloaded by the model's device_map"):
            attempt()
        assert not attached(model)


def test_train_on_a_user_nf4_model_after_an_evaluation_pass(setup):
    _, base_dir, _ = setup
    model = user_model(base_dir, "nf4", load_in_4bit=True, bnb_4bit_quant_type="nf4")
    evaluate(model, char_tokenizer(), EXAMPLES, generate=False, progress=False)  # may repack 4-bit layers
    result = train(model, char_tokenizer(), EXAMPLES * 4, Recipe(steps=8, batch_size=4, lr=2e-2), device="cpu",
                   progress=False)
    assert result.losses[-1] < result.losses[0]


def test_a_hub_id_is_downloaded_once_into_hub_home_and_then_works_offline(tmp_path, hub_home, monkeypatch):
    from click.testing import CliRunner
    from hubserver import HubServer
    from huggingface_hub import HfApi, constants

    from cli.main import cli
    from hub.errors import NotFound
    from hub.fingerprint import fingerprint, fingerprint_path

    token = "hf_token_for_byom_tests"
    user_cache = tmp_path / "user-hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(user_cache))  # the user's own cache is never written
    first_dir, second_dir = save_base(tmp_path / "v1", seed=0), save_base(tmp_path / "v2", seed=5)
    with HubServer(tokens={token: "alice"}) as server:
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo("alice/tiny")
        first = api.upload_folder(folder_path=first_dir, repo_id="alice/tiny").oid
        api.upload_folder(folder_path=second_dir, repo_id="alice/tiny")  # main moves on to other weights
        monkeypatch.setenv("HF_ENDPOINT", server.url)

        latest = fingerprint("alice/tiny")
        assert latest == fingerprint_path(second_dir, cache_dir=tmp_path / "c")
        pinned = fingerprint(f"alice/tiny@{first}")
        assert pinned == fingerprint_path(first_dir, cache_dir=tmp_path / "c")
        downloads = hub_home / "cache" / "hf"
        blobs = {p: p.stat().st_mtime_ns for p in downloads.rglob("blobs/*")}
        assert blobs and not user_cache.exists()
        assert fingerprint("alice/tiny") == latest  # asks the server, downloads nothing again
        assert {p: p.stat().st_mtime_ns for p in downloads.rglob("blobs/*")} == blobs

        base = load_base(f"alice/tiny@{first}", device="cpu")
        assert base.fingerprint == pinned and base.tokenizer is not None
        with pytest.raises(NotFound, match="alice/missing"):
            fingerprint("alice/missing")

        result = CliRunner().invoke(cli, ["register", str(make_lora(second_dir, tmp_path / "lora", seed=3)),
                                          "--name", "a", "--base", "alice/tiny"])
        assert result.exit_code == 0, result.output
        # The user's own transformers load of the id, into their own cache: recognised through the Hub caches.
        monkeypatch.setattr(constants, "ENDPOINT", server.url)  # as HF_ENDPOINT set before the import does
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        theirs = AutoModelForCausalLM.from_pretrained("alice/tiny", cache_dir=tmp_path / "transformers-cache",
                                                      quantization_config=BitsAndBytesConfig(**HUB_NF4))
        check = activate(theirs, "a", hub=Hub()).base_check
        assert check.match == "exact" and "checked against the nf4" in check.identity.how

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server is gone too
    assert fingerprint("alice/tiny") == latest
    assert load_base(f"alice/tiny@{first}", device="cpu").fingerprint == pinned
    result = CliRunner().invoke(cli, ["fingerprint", "alice/tiny"])
    assert result.exit_code == 0 and latest.weights_hash in result.output
    result = CliRunner().invoke(cli, ["fingerprint", "alice/other"])
    assert result.exit_code == 1 and "HF_HUB_OFFLINE is set" in result.output
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in EXAMPLES))
    result = CliRunner().invoke(cli, ["eval", "a", "--base", "alice/tiny", "--data", str(data), "--quantize", "none",
                                      "--device", "cpu", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["base_check"].startswith("base check: exact match")


def test_every_command_that_runs_a_model_takes_device():
    """The commands that load a base (those with --quantize) all take --device, parsed alike: a torch device this
    machine has."""
    from click.testing import CliRunner

    from cli.main import cli

    running = sorted(name for name, command in cli.commands.items()
                     if any(param.name == "quantize" for param in command.params))
    assert running == ["compose", "eval", "rank", "serve", "train"]
    for name in running:
        assert any(param.name == "device" for param in cli.commands[name].params), name
        result = CliRunner().invoke(cli, [name, "--device", "tpu:x"])
        assert result.exit_code == 2 and "'tpu:x' is not a device" in result.output, (name, result.output)
        if not torch.cuda.is_available():
            result = CliRunner().invoke(cli, [name, "--device", "cuda:1"])
            assert result.exit_code == 2 and "CUDA is not available" in result.output, (name, result.output)


def test_a_full_precision_base_is_checked_without_importing_bitsandbytes(setup):
    """Looking for bitsandbytes layers in a user's fp32 model does not import bitsandbytes (seconds: it imports
    torch's compiler); a fresh interpreter, since this one has imported it already."""
    hub, base_dir, _ = setup
    code = ("import sys; from transformers import AutoModelForCausalLM; from hub.client import Hub; "
            f"model = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}); "
            f"check = Hub(home={str(hub.settings.home)!r}).activate(model, 'a').base_check; "
            "print(check.match, 'bitsandbytes' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["exact", "False"]


def test_revisions_that_could_escape_the_cache_are_not_model_ids():
    from hub.snapshots import parse_model_id

    assert parse_model_id("alice/tiny@refs/pr/1") == ("alice/tiny", "refs/pr/1")
    for text in ("alice/tiny@../../etc", "alice/tiny@/abs", "../x/y", "alice/tiny@a/../../b", "/abs/path"):
        assert parse_model_id(text) is None


@pytest.mark.slow
def test_smollm2_loaded_in_nf4_by_transformers_takes_a_registered_adapter(smollm2_dir, tmp_path):
    """The issue's own call: SmolLM2 in nf4 through BitsAndBytesConfig, then activate. PEFT on the same load is
    the oracle."""
    from peft import LoraConfig, get_peft_model

    issue_nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(user_model(smollm2_dir, "nf4", **issue_nf4), config).eval()
    peft.save_pretrained(tmp_path / "lora")
    hub = Hub(home=tmp_path / "home")
    hub.register(tmp_path / "lora", name="smol", base=smollm2_dir)

    model = user_model(smollm2_dir, "nf4", **issue_nf4)
    handle = activate(model, "smol", hub=hub)
    assert handle.base_check.match == "exact" and handle.base_check.identity.source == smollm2_dir
    ids = torch.tensor([[1, 4093, 28, 253, 1789, 314, 260, 3287]])
    with torch.no_grad():
        diff = float((model(ids).logits - peft(input_ids=ids).logits).abs().max())
    print(f"max |logits difference| SmolLM2 nf4 activate vs PEFT: {diff:.2e}")
    assert diff <= 1e-4
