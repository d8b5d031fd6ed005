"""Attaching and detaching: checks before changes, exact restoration, stacks, merging, loading, quantized training."""

from __future__ import annotations

import gc
import tracemalloc
import warnings
import weakref

import pytest
import torch
from peft import LoraConfig
from runtime_peft import (
    LLAMA_CASES,
    module_types,
    peft_adapter,
    same_state,
    snapshot,
    tiny_llama,
)

from hub.errors import Conflict, HubError, Incompatible, InvalidArtifact, NotFound
from hub.fingerprint import fingerprint
from hub.formats import Adapter
from hub.methods import lookup
from hub.runtime import (
    AdaptedLinear,
    attach,
    attached,
    dequantize_merged,
    detach,
    load_base,
    merge_into_base,
)
from hub.sites import base_weight

warnings.filterwarnings("ignore", message=".*(Merge|Unmerge|MatMul8bitLt).*")


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A few PEFT-made adapters for the tiny Llama, read by the hub."""
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama()
    made = {}
    for case in ("lora", "dora", "loha", "ia3", "oft", "lora_bias"):
        made[case] = peft_adapter(model, LLAMA_CASES[case](), root / case)[1]
    return made


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(11))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_detach_restores_the_original_module_objects(llama, adapters, tokens):
    originals = {name: module for name, module in llama.named_modules()}
    base = logits(llama, tokens)
    handles = [attach(llama, adapters[c], name=c) for c in ("lora", "dora", "ia3", "oft")]
    assert isinstance(llama.model.layers[0].self_attn.q_proj, AdaptedLinear)
    for handle in reversed(handles):
        handle.detach()
    assert {name: module for name, module in llama.named_modules()} == originals
    assert torch.equal(logits(llama, tokens), base)
    assert attached(llama) == {}


def test_detach_in_any_order_and_by_name(llama, adapters, tokens):
    base = logits(llama, tokens)
    attach(llama, adapters["lora"], name="a")
    only_b = attach(llama, adapters["loha"], name="b")
    with_both = logits(llama, tokens)
    detach(llama, "a")
    without_a = logits(llama, tokens)
    only_b.detach()
    attach(llama, adapters["loha"], name="b")
    assert torch.equal(logits(llama, tokens), without_a)
    assert not torch.equal(with_both, without_a)
    detach(llama, "b")
    assert torch.equal(logits(llama, tokens), base)
    with pytest.raises(NotFound, match="no adapter named 'b'"):
        detach(llama, "b")


def test_attach_detach_100_times_leaks_nothing(llama, adapters, tokens):
    modules_before = len(list(llama.modules()))
    params_before = sum(p.numel() for p in llama.parameters())
    deltas: list[weakref.ref] = []

    def cycle():
        handle = attach(llama, [adapters["lora"], adapters["dora"]], name="x")
        logits(llama, tokens)
        deltas.extend(weakref.ref(d) for h in handle.handles for d in h.deltas())
        handle.detach()

    for _ in range(5):  # warm caches and allocators
        cycle()
    gc.collect()
    tracemalloc.start()
    first, _ = tracemalloc.get_traced_memory()
    for _ in range(100):
        cycle()
    gc.collect()
    last, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(list(llama.modules())) == modules_before
    assert sum(p.numel() for p in llama.parameters()) == params_before
    assert all(ref() is None for ref in deltas), "detached deltas must be freed"
    assert last - first < 256 * 1024, f"Python allocations grew by {last - first} bytes over 100 cycles"


def _unchanged_after(model, call, error, match):
    before, types = snapshot(model), module_types(model)
    with pytest.raises(error, match=match) as raised:
        call()
    assert same_state(model, before)
    assert module_types(model) == types
    assert attached(model) == {}
    message = str(raised.value)
    assert "\n" not in message and isinstance(raised.value, HubError)
    return message


def test_adapter_for_another_base_is_refused(llama, adapters, tmp_path):
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(0.01)
    theirs = fingerprint(other)
    _unchanged_after(
        llama, lambda: attach(llama, adapters["lora"], base_fingerprint=theirs), Incompatible,
        "same shapes, different weights; pass allow_structural=True",
    )
    handle = attach(llama, adapters["lora"], base_fingerprint=theirs, allow_structural=True)
    handle.detach()
    attach(llama, adapters["lora"], base_fingerprint=fingerprint(tiny_llama())).detach()
    wider = fingerprint(tiny_llama(hidden=32))
    _unchanged_after(
        llama, lambda: attach(llama, adapters["lora"], base_fingerprint=wider, allow_structural=True), Incompatible,
        "different shapes",
    )


def test_target_module_the_model_lacks(adapters):
    small = tiny_llama()
    small.model.layers = small.model.layers[:1]
    message = _unchanged_after(small, lambda: attach(small, adapters["dora"]), Incompatible, "does not have")
    assert "model.layers.1." in message


def test_shape_mismatch_names_module_and_shapes(adapters, tmp_path):
    wide = tiny_llama(hidden=32)
    _unchanged_after(
        wide, lambda: attach(wide, adapters["lora"]), Incompatible,
        r"^module model\.layers\.0\.mlp\.down_proj: lora_A has shape \(4, 128\) but the model needs \(4, 64\)$",
    )


def test_rank_contradicting_tensors(llama, adapters):
    lora = adapters["lora"]
    wrong = Adapter(config={**lora.config, "r": 8}, tensors=lora.tensors)
    _unchanged_after(llama, lambda: attach(llama, wrong), InvalidArtifact, r"rank 4 but the config says r=8")
    loha = adapters["loha"]
    wrong = Adapter(config={**loha.config, "rank_pattern": {"down_proj": 2}}, tensors=loha.tensors)
    _unchanged_after(llama, lambda: attach(llama, wrong), InvalidArtifact, r"down_proj: tensors have rank \[4\]")


def test_unknown_and_stored_only_methods_are_refused(llama, adapters):
    """Dispatch is by the config's PEFT type, never by a name: a type nobody defines is unknown; a PEFT type the
    hub only stores says so in one line."""
    with pytest.raises(InvalidArtifact, match="unknown adapter method"):
        lookup("../os")
    with pytest.raises(InvalidArtifact, match="unknown adapter method 'NOT_A_METHOD'"):
        Adapter(config={"peft_type": "NOT_A_METHOD"}, tensors={})
    vera = Adapter(config={"peft_type": "VERA"}, tensors=dict(adapters["lora"].tensors))
    _unchanged_after(llama, lambda: attach(llama, vera), Incompatible,
                     "^vera adapters are stored and shared here but cannot be attached yet$")


def test_failing_stack_leaves_the_model_as_it_was(llama, adapters):
    broken = Adapter(config={**adapters["lora"].config, "r": 2}, tensors=adapters["lora"].tensors)
    _unchanged_after(llama, lambda: attach(llama, [adapters["dora"], broken]), InvalidArtifact, "r=2")


def test_names_must_be_unique(llama, adapters):
    attach(llama, adapters["lora"], name="same")
    before = snapshot(llama)
    with pytest.raises(Conflict, match="'same' is already attached"):
        attach(llama, adapters["loha"], name="same")
    assert same_state(llama, before)
    detach(llama, "same")


def test_unsupported_lora_variants_are_refused(llama, adapters):
    lora = adapters["lora"]
    for key, value, match in [
        ("init_lora_weights", "pissa", "rewrites the base weights"),
        ("alora_invocation_tokens", [1, 2], "aLoRA"),
        ("layer_replication", [[0, 2]], "layer replication"),
    ]:
        odd = Adapter(config={**lora.config, key: value}, tensors=lora.tensors)
        _unchanged_after(llama, lambda odd=odd: attach(llama, odd), Incompatible, match)
    extra = Adapter(config=lora.config, tensors={**lora.tensors, "base_model.model.lm_head.weight": torch.ones(2)})
    _unchanged_after(llama, lambda: attach(llama, extra), Incompatible, "lm_head")
    untargeted = Adapter(config={**lora.config, "target_modules": ["q_proj"]}, tensors=lora.tensors)
    _unchanged_after(llama, lambda: attach(llama, untargeted), InvalidArtifact, "its own config does not target")


def test_stack_equals_peft_active_adapters(llama, tmp_path, tokens):
    from peft import PeftModel

    first, a = peft_adapter(llama, LLAMA_CASES["lora"](), tmp_path / "a", seed=1)
    _, b = peft_adapter(llama, LLAMA_CASES["rslora"](), tmp_path / "b", seed=2)
    first.load_adapter(tmp_path / "b", adapter_name="b")
    first.base_model.set_adapter(["default", "b"])
    with torch.no_grad():
        expected = first(tokens).logits
    assert isinstance(first, PeftModel)
    handle = attach(llama, [a, b], name="ab")
    got = logits(llama, tokens)
    handle.detach()
    assert (got - expected).abs().max() <= 1e-5


def test_static_weight_scales_a_lora(llama, adapters, tokens):
    lora = adapters["lora"]
    halved = Adapter(config={**lora.config, "lora_alpha": lora.config["lora_alpha"] / 2}, tensors=lora.tensors)
    attach(llama, halved, name="half-alpha")
    expected = logits(llama, tokens)
    detach(llama, "half-alpha")
    handle = attach(llama, lora, name="half-weight", weight=0.5)
    assert (logits(llama, tokens) - expected).abs().max() <= 1e-5
    handle.set_weight(0.0)
    assert torch.equal(logits(llama, tokens), logits(tiny_llama(), tokens))
    handle.detach()


@pytest.mark.parametrize("case", ["lora", "dora", "loha", "ia3", "oft"])
def test_merge_into_full_precision_base_is_exact(llama, adapters, tokens, case):
    handle = attach(llama, adapters[case], name=case, weight=0.7)
    expected = logits(llama, tokens)
    merge_into_base(llama, case)
    assert attached(llama) == {}
    assert not any(isinstance(m, AdaptedLinear) for m in llama.modules())
    assert (logits(llama, tokens) - expected).abs().max() <= 1e-5
    with pytest.raises(NotFound):
        handle.detach()


def test_merge_of_lora_bias_needs_a_base_bias(llama, adapters, tmp_path):
    from runtime_peft import tiny_bert

    attach(llama, adapters["lora_bias"], name="b")
    before = snapshot(llama)
    with pytest.raises(Incompatible, match="adds a bias at model.layers.0.self_attn.q_proj, whose base layer has none"):
        merge_into_base(llama, "b")
    assert same_state(llama, before) and "b" in attached(llama)

    bert = tiny_bert()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "dense"], lora_bias=True, init_lora_weights=False)
    _, adapter = peft_adapter(bert, config, tmp_path)
    tokens = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    attach(bert, adapter, name="b")
    with torch.no_grad():
        expected = bert(tokens).last_hidden_state
        merge_into_base(bert, "b")
        assert (bert(tokens).last_hidden_state - expected).abs().max() <= 1e-5


def test_merge_refuses_when_another_adapter_reads_the_base(llama, adapters):
    attach(llama, adapters["dora"], name="d")
    attach(llama, adapters["lora"], name="l")
    before = snapshot(llama)
    with pytest.raises(Incompatible, match="'d' also act there on the base weight"):
        merge_into_base(llama, "l")
    assert same_state(llama, before)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return folder


def test_load_base_fingerprints_the_folder_and_freezes(tiny_folder, monkeypatch):
    base = load_base(tiny_folder)
    assert base.fingerprint == fingerprint(tiny_llama())
    assert base.model.hub_fingerprint == base.fingerprint
    assert not any(p.requires_grad for p in base.model.parameters())
    assert base.quantize is None and not base.model.training
    with pytest.raises(NotFound, match="no model folder"):
        load_base(tiny_folder / "missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub id is downloaded when online (tests/test_byom.py)
    with pytest.raises(NotFound, match="not in the local caches"):
        load_base("nobody/no-such-model-here")
    with pytest.raises(Incompatible, match="unknown quantization 'nf3'"):
        load_base(tiny_folder, quantize="nf3")


@pytest.fixture(scope="module")
def nf4(tiny_folder):
    return load_base(tiny_folder, quantize="nf4")


def test_nf4_base_keeps_the_differentiable_path_and_its_fingerprint(nf4):
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in nf4.model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert nf4.fingerprint == fingerprint(tiny_llama())


def test_training_after_evaluation_on_nf4(nf4, tmp_path, tokens):
    model = nf4.model
    _, adapter = peft_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                            "down_proj"]), tmp_path)
    handle = attach(model, adapter, name="train")
    try:
        logits(model, tokens)  # an evaluation pass first: the trap is the kernel it may switch to
        params = list(handle.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=1e-2)
        model.train()
        losses = []
        for _ in range(4):
            loss = model(tokens, labels=tokens).loss
            loss.backward()
            # B starts at zero (PEFT's default init), so B is where the first gradient must arrive, through the
            # frozen 4-bit layers above it.
            assert all(d.lora_B.grad is not None and d.lora_B.grad.abs().sum() > 0 for d in handle.deltas())
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
    finally:
        model.eval()
        handle.detach()


def test_merge_on_quantized_base_is_refused_and_dequantize_merged_is_offered(nf4, adapters, tokens):
    model = nf4.model
    attach(model, adapters["dora"], name="d")
    attach(model, adapters["ia3"], name="i", weight=0.5)
    try:
        before = snapshot(model)
        with pytest.raises(Incompatible, match=r"quantized \(nf4\).*dequantize_merged"):
            merge_into_base(model, "d")
        assert same_state(model, before)
        expected = logits(model, tokens)
        merged = dequantize_merged(model)
        assert not any("bitsandbytes" in type(m).__module__ for m in merged.modules())
        assert isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
        assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
        assert (logits(merged, tokens) - expected).abs().max() <= 1e-4
        assert same_state(model, before), "the quantized model itself is untouched"
    finally:
        detach(model, "d")
        detach(model, "i")


def test_dequantizing_a_repacked_4bit_weight_reads_the_current_format():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 96, bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 64) * 0.05, requires_grad=False, quant_type="nf4", module=layer)
    layer = layer.to("cpu")
    expected = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    # What bitsandbytes does on a CPU with AVX512-BF16 at the first eval forward (this CPU may lack it).
    layer.weight.data, layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    naive = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert (naive.reshape(-1)[: expected.numel()] - expected.reshape(-1)).abs().max() > 0.05
    got = base_weight(layer)
    # The packed format keeps block scales in bf16: equal up to that rounding.
    assert (got - expected).abs().max() <= 1e-3
    assert layer.weight.quant_state.packing_format_for_cpu, "reading must not change the live layer"
