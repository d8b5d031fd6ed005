"""DenseLoRA (arXiv 2505.23808), the hub's own format: the paper's update on fp32, nf4 and int8 bases; fewer
parameters than LoRA r=8 on the same targets; a file that goes register → push → pull → activate bit for bit;
stacks with LoRA adding both effects; a mixture expert; merges and sums refused; malformed files refused at
register. Training is tests/test_train.py's (every trainable method); the date task on SmolLM2-nf4 is
bench/bench_train_tasks.py --methods denselora.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config
from hubserver import HubServer
from transformers import LlamaConfig, LlamaForCausalLM

from hub import compose
from hub.client import Hub
from hub.composition import RouterConfig
from hub.errors import HubError, Incompatible, InvalidArtifact
from hub.formats import Adapter, write_adapter
from hub.methods import denselora, lora
from hub.remote import Remote
from hub.remote.cards import model_card
from hub.runtime import attach, dequantize_merged, load_base, merge_into_base
from hub.sites import find_module, unwrap

TOKEN = "hf_denselora"
IDS = torch.tensor([[1, 5, 9, 33, 70, 101, 3], [4, 4, 8, 15, 16, 23, 42]])
PREFIX = "base_model.model."
BASE_ID = "hub-tests/tiny-llama"  # the base's Hub id, which exports keep as base_model_name_or_path


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def moved(adapter: Adapter, seed: int) -> Adapter:
    """``adapter`` with every tensor moved off its initial value (a fresh DenseLoRA is the identity), named after
    its base as a trained one is."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in adapter.tensors.items()}
    return Adapter(config={**adapter.config, "base_model_name_or_path": BASE_ID}, tensors=tensors)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("denselora-base")
    tiny().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dense() -> Adapter:
    return moved(denselora.new_adapter(tiny(), rank=4), seed=1)


@pytest.fixture(scope="module")
def lora_adapter() -> Adapter:
    return moved(lora.new_adapter(tiny(), rank=4, targets=["q_proj", "v_proj", "o_proj"]), seed=2)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def paper_delta(adapter: Adapter, path: str, x: torch.Tensor) -> torch.Tensor:
    """s · GELU(D · M · GELU(E x)), straight from the file's tensors."""
    group = path.rsplit(".", 1)[-1]
    encoder = adapter.tensors[f"{PREFIX}lora_encoder.{group}"]
    decoder = adapter.tensors[f"{PREFIX}lora_decoder.{group}"]
    m = adapter.tensors[f"{PREFIX}{path}.lora_M"]
    scale = adapter.config["lora_alpha"] / adapter.config["r"]
    return scale * F.gelu(F.gelu(x @ encoder.T) @ m.T @ decoder.T)


# ---------------------------------------------------------------------------------------------------------------
# The method


def test_fresh_adapters_are_the_base_and_smaller_than_lora_r8_on_the_same_targets() -> None:
    model = tiny()
    before = logits(model)
    fresh = denselora.new_adapter(model)
    handle = attach(model, fresh)
    assert torch.equal(logits(model), before)
    # One encoder/decoder per module name (5 groups), one M per module (2 layers × 5), each trained once.
    params = handle.trainable_parameters()
    assert len(params) == len({id(p) for p in params}) == 2 * 5 + 2 * 5
    handle.detach()

    # SmolLM2-135M's shapes (the hub's demo base), built without weights.
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3)
    with torch.device("meta"):
        smollm2 = LlamaForCausalLM(config)
    ours = denselora.new_adapter(smollm2)
    theirs = lora.new_adapter(smollm2, rank=8, targets=ours.config["target_modules"])
    count = {name: sum(t.numel() for t in a.tensors.values()) for name, a in (("dense", ours), ("lora", theirs))}
    assert count["dense"] < count["lora"], count


@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
def test_each_module_adds_the_papers_update_on_any_base(quantize: str | None, base_dir: Path, dense: Adapter) -> None:
    model = load_base(base_dir, quantize=quantize).model
    before = logits(model)
    handle = attach(model, dense)
    changed = logits(model)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for path in dense.modules():
        site = find_module(model, path)
        inputs = x[:, : unwrap(site).in_features]
        with torch.no_grad():
            added = site(inputs) - unwrap(site)(inputs)
        torch.testing.assert_close(added, paper_delta(dense, path, inputs), rtol=1e-4, atol=1e-5)
    handle.detach()
    assert (changed - before).abs().max() > 1e-2 and torch.equal(logits(model), before)


def test_a_file_goes_register_push_pull_activate_bit_for_bit(tmp_path: Path, base_dir: Path, dense: Adapter) -> None:
    folder = write_adapter(dense, tmp_path / "dense")
    source = Hub(home=tmp_path / "source")
    registered = source.register(folder, name="dense", base=base_dir, base_name=BASE_ID).version
    assert (registered.method, registered.rank) == ("denselora", 4)
    with HubServer(tokens={TOKEN: "alice"}) as server:
        Remote(source, endpoint=server.url, token=TOKEN).push("dense@1", "alice/dense")
        target = Hub(home=tmp_path / "target")
        pulled = Remote(target, endpoint=server.url, token=TOKEN).pull("alice/dense", "v1")
    assert pulled.version.digest == registered.digest
    card = model_card(registered, repo_id="alice/dense")  # what the push wrote: PEFT cannot load this format
    assert "DENSELORA is adapter hub's own format" in card and "PeftModel" not in card
    exported = target.export("dense@1", tmp_path / "exported")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (exported / name).read_bytes() == (folder / name).read_bytes(), name

    expected_model = tiny()
    attach(expected_model, dense)
    model = tiny()
    target.activate(model, "dense@1")
    assert torch.equal(logits(model), logits(expected_model))


def test_stacked_with_a_lora_each_module_adds_both_updates(dense: Adapter, lora_adapter: Adapter) -> None:
    model = tiny()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    paths = sorted({*dense.modules(), *lora_adapter.modules()})

    def added(adapters: list[Adapter]) -> dict[str, torch.Tensor]:
        handle = compose(adapters, kind="stack").attach(model)
        out = {}
        with torch.no_grad():
            for path in paths:
                site = find_module(model, path)
                inputs = x[:, : unwrap(site).in_features]
                out[path] = site(inputs) - unwrap(site)(inputs)
        handle.detach()
        return out

    both, alone, other = added([dense, lora_adapter]), added([dense]), added([lora_adapter])
    shared = set(dense.modules()) & set(lora_adapter.modules())
    assert shared and set(dense.modules()) - shared and set(lora_adapter.modules()) - shared
    for path in paths:
        torch.testing.assert_close(both[path], alone[path] + other[path], rtol=0, atol=1e-6)


def test_a_mixture_gates_a_denselora_expert(dense: Adapter, lora_adapter: Adapter) -> None:
    model = tiny()
    expected = []
    for adapter in (dense, lora_adapter):
        handle = attach(model, adapter)
        expected.append(logits(model))
        handle.detach()
    mixture = compose([dense, lora_adapter], kind="mixture", router=RouterConfig(top_k=1))
    handle = mixture.attach(model)
    try:
        for chosen, bias in ((0, [4.0, 0.0]), (1, [0.0, 4.0])):  # every token picks one expert: that expert alone
            with torch.no_grad():
                mixture.module.bias.copy_(torch.tensor(bias))
            torch.testing.assert_close(logits(model), expected[chosen], rtol=0, atol=1e-5)
    finally:
        handle.detach()
    # Equal gates: fitting the gate gets a gradient through the DenseLoRA expert's output.
    mixture = compose([dense, lora_adapter], kind="mixture")
    handle = mixture.attach(model)
    try:
        model(IDS).logits.square().mean().backward()
    finally:
        handle.detach()
    grad = mixture.module.bias.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().min() > 0


def test_merges_and_sums_are_refused_in_one_line(dense: Adapter, lora_adapter: Adapter) -> None:
    other = moved(denselora.new_adapter(tiny(), rank=4), seed=3)
    for adapters in ([dense, lora_adapter], [dense, other]):
        with pytest.raises(Incompatible) as refused:
            compose(adapters, [0.5, 0.5])
        assert "denselora" in str(refused.value) and "\n" not in str(refused.value)
    model = tiny()
    attach(model, dense, name="dense")
    changed = logits(model)
    with pytest.raises(Incompatible, match="^denselora adapters cannot be merged into base weights$"):
        merge_into_base(model, "dense")
    with pytest.raises(Incompatible, match="^denselora adapter 'dense' cannot be merged into base weights$"):
        dequantize_merged(model)
    assert torch.equal(logits(model), changed)  # still attached, unchanged


# ---------------------------------------------------------------------------------------------------------------
# Malformed files


def _drop(key: str):
    return lambda tensors, config: tensors.pop(PREFIX + key)


def _reshape(key: str, shape: tuple[int, ...]):
    return lambda tensors, config: tensors.__setitem__(PREFIX + key, torch.zeros(shape))


@pytest.mark.parametrize(("change", "error", "message"), [
    (lambda t, c: c.update(r=0), InvalidArtifact, "adapter_config.json: r must be an integer >= 1, not 0"),
    (lambda t, c: c.update(r=-2), InvalidArtifact, "adapter_config.json: r must be an integer >= 1, not -2"),
    (lambda t, c: c.pop("r"), InvalidArtifact, "DenseLoRA adapter_config.json has no r (the rank)"),
    (_drop("lora_encoder.q_proj"), InvalidArtifact,
     "DenseLoRA group q_proj lacks its shared tensor base_model.model.lora_encoder.q_proj"),
    (lambda t, c: [t.pop(PREFIX + f"lora_{kind}coder.k_proj") for kind in ("en", "de")], InvalidArtifact,
     "module model.layers.0.self_attn.k_proj has no shared tensors: missing base_model.model.lora_encoder.k_proj"
     " and its decoder"),
    (_reshape("model.layers.1.mlp.up_proj.lora_M", (4, 3)), InvalidArtifact,
     "module model.layers.1.mlp.up_proj: lora_M has shape (4, 3), not (r, r) = (4, 4)"),
    (_reshape("lora_encoder.v_proj", (3, 32)), InvalidArtifact,
     "DenseLoRA base_model.model.lora_encoder.v_proj has shape (3, 32), not [r=4, in]"),
    (_reshape("lora_decoder.down_proj", (32, 5)), InvalidArtifact,
     "DenseLoRA base_model.model.lora_decoder.down_proj has shape (32, 5), not [out, r=4]"),
    (_reshape("lora_encoder.q_proj", (4, 48)), Incompatible,
     "needs model.layers.0.self_attn.q_proj.weight of shape 32×48, the base has 32×32"),
    (lambda t, c: t.update({PREFIX + "lora_encoder.gate_proj": torch.zeros(4, 32),
                            PREFIX + "lora_decoder.gate_proj": torch.zeros(64, 4)}), InvalidArtifact,
     "DenseLoRA group gate_proj has shared tensors but adapts no module"),
])
def test_malformed_files_are_refused_at_register_in_one_line(change, error: type[HubError], message: str,
                                                             tmp_path: Path, base_dir: Path, dense: Adapter) -> None:
    tensors, config = dict(dense.tensors), dict(dense.config)
    change(tensors, config)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file(tensors, folder / "adapter_model.safetensors")
    hub = Hub(home=tmp_path / "hub")
    with pytest.raises(error) as refused:
        hub.register(folder, name="bad", base=base_dir)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert list(hub.list()) == []
