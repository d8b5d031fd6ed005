"""Every linear-site method, made and saved by PEFT, attached by the hub: the same outputs as PEFT's own model.

Tiny random Llama, BERT and GPT-2 models, full precision and bitsandbytes nf4/int8. Where PEFT cannot build a
method on a quantized base (LoHa/LoKr on nf4, DoRA on int8), the hub's output is checked against the same
adapter merged into a dequantized copy instead.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftModel
from runtime_peft import LLAMA_CASES, peft_adapter, tiny_bert, tiny_gpt2, tiny_llama

from hub.formats import read_adapter
from hub.runtime import attach, dequantize_merged, load_base

warnings.filterwarnings("ignore", message=".*(Merge|Unmerge|MatMul8bitLt|fan_in_fan_out).*")
TOL = 1e-5


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_method_matches_peft(case, llama, tokens, tmp_path):
    peft_model, adapter = peft_adapter(llama, LLAMA_CASES[case](), tmp_path)
    with torch.no_grad():
        expected = peft_model(tokens).logits
        base = llama(tokens).logits
    handle = attach(llama, adapter, name=case)
    with torch.no_grad():
        got = llama(tokens).logits
    handle.detach()
    with torch.no_grad():
        restored = llama(tokens).logits
    assert (expected - base).abs().max() > 1e-3, "the adapter must change the output for the test to mean anything"
    assert (got - expected).abs().max() <= TOL
    assert torch.equal(restored, base)


GPT2_CASES = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                               init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True,
                               init_lora_weights=False),
    "lora_bias": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                    lora_bias=True, init_lora_weights=False),
    "lora_wte": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["wte"], init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                             fan_in_fan_out=True, init_ia3_weights=False),
}
BERT_CASES = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], lora_bias=True,
                               init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True,
                               init_lora_weights=False),
    "lora_embedding": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["word_embeddings"],
                                         init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=["query", "value"], init_weights=False),
    "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=["query", "value"], init_weights=False),
    "ia3": lambda: IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                             init_ia3_weights=False),
    "oft": lambda: OFTConfig(r=0, oft_block_size=8, target_modules=["value", "dense"], init_weights=False),
}


@pytest.mark.parametrize(
    ("family", "case"),
    [("gpt2", c) for c in sorted(GPT2_CASES)] + [("bert", c) for c in sorted(BERT_CASES)],
)
def test_gpt2_and_bert_match_peft(family, case, tmp_path):
    model = tiny_gpt2() if family == "gpt2" else tiny_bert()
    config = (GPT2_CASES if family == "gpt2" else BERT_CASES)[case]()
    tokens = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(5))

    def run(m):
        out = m(tokens)
        return out.logits if family == "gpt2" else out.last_hidden_state

    peft_model, adapter = peft_adapter(model, config, tmp_path)
    with torch.no_grad():
        expected, base = run(peft_model), run(model)
    handle = attach(model, adapter, name=case)
    with torch.no_grad():
        got = run(model)
    handle.detach()
    assert (expected - base).abs().max() > 1e-4
    assert (got - expected).abs().max() <= TOL
    with torch.no_grad():
        assert torch.equal(run(model), base)


def test_generate_with_kv_cache_matches_peft(llama, tmp_path):
    peft_model, adapter = peft_adapter(llama, LLAMA_CASES["dora"](), tmp_path)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = peft_model.generate(input_ids=prompt, **kwargs)
    with attach_scoped(llama, adapter):
        got = llama.generate(input_ids=prompt, use_cache=True, **kwargs)
        no_cache = llama.generate(input_ids=prompt, use_cache=False, **kwargs)
    assert torch.equal(got, expected)
    assert torch.equal(no_cache, expected)


class attach_scoped:
    def __init__(self, model, adapter):
        self.model, self.adapter = model, adapter

    def __enter__(self):
        self.handle = attach(self.model, self.adapter)
        return self.handle

    def __exit__(self, *exc):
        self.handle.detach()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return folder


# Methods PEFT itself runs on each bitsandbytes base (see the module docstring for the others).
QUANTIZED_PEFT = {
    "nf4": ["lora", "rslora", "dora", "lora_bias", "adalora", "ia3", "oft", "boft"],
    "int8": ["lora", "lora_bias", "adalora", "loha", "lokr", "ia3", "oft", "boft"],
}
QUANTIZED_HUB_ONLY = {"nf4": ["loha", "lokr", "lokr_decomposed"], "int8": ["dora"]}


@pytest.fixture(scope="module", params=["nf4", "int8"])
def quantized(request, tiny_folder):
    return request.param, load_base(tiny_folder, quantize=request.param).model


def test_quantized_methods_match_peft_on_the_same_base(quantized, tiny_folder, tokens, tmp_path):
    kind, model = quantized
    reference = tiny_llama()
    for case in QUANTIZED_PEFT[kind]:
        folder = tmp_path / case
        peft_adapter(reference, LLAMA_CASES[case](), folder)
        adapter = read_adapter(folder)
        # PEFT wraps a deepcopy of the same quantized base; the hub attaches to the base itself.
        peft_model = PeftModel.from_pretrained(_copy_quantized(tiny_folder, kind), folder).eval()
        with torch.no_grad():
            expected = peft_model(tokens).logits
            base = model(tokens).logits
        handle = attach(model, adapter, name=case)
        with torch.no_grad():
            got = model(tokens).logits
        handle.detach()
        assert (expected - base).abs().max() > 1e-3, case
        assert (got - expected).abs().max() <= 1e-4, case
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, base), case


def _copy_quantized(folder, kind):
    # int8 parameters do not survive deepcopy in bitsandbytes; loading the folder again is the same base.
    return load_base(folder, quantize=kind).model


def test_quantized_methods_peft_cannot_run_match_the_dequantized_merge(quantized, tokens, tmp_path):
    kind, model = quantized
    reference = tiny_llama()
    for case in QUANTIZED_HUB_ONLY[kind]:
        _, adapter = peft_adapter(reference, LLAMA_CASES[case](), tmp_path / case)
        handle = attach(model, adapter, name=case)
        with torch.no_grad():
            got = model(tokens).logits
            merged = dequantize_merged(model)(tokens).logits
            handle.detach()
            base = model(tokens).logits
        assert (got - base).abs().max() > 1e-3, case
        # The int8 base quantizes activations too, which its dequantized copy does not.
        assert (got - merged).abs().max() <= (1e-4 if kind == "nf4" else 0.1), case
