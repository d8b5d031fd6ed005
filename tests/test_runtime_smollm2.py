"""Integration: the real SmolLM2-135M-Instruct, fp32 and nf4. Adapters made and saved by PEFT (cached), read and
attached by the hub: the same logits as PEFT loading them (max abs diff <= 1e-4) and the same greedy tokens."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
)
from runtime_peft import LLAMA_ALL, peft_adapter

from hub.formats import read_adapter
from hub.runtime import attach, load_base

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
warnings.filterwarnings("ignore", message=".*(Merge|Unmerge|right-padding).*")

CASES = {
    "lora": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_ALL, init_lora_weights=False),
    "rslora_patterns": lambda: LoraConfig(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 4},
                                          target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[0, 5, 9],
                                          init_lora_weights=False),
    "dora": lambda: LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights=False),
    "adalora": lambda: AdaLoraConfig(init_r=8, target_r=4, total_step=10, lora_alpha=16,
                                     target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False),
    "lokr": lambda: LoKrConfig(r=8, alpha=8, target_modules=["q_proj", "down_proj"], init_weights=False),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "oft": lambda: OFTConfig(r=0, oft_block_size=32, target_modules=["q_proj", "v_proj"], init_weights=False),
    "boft": lambda: BOFTConfig(boft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False),
}
# PEFT cannot build LoHa / LoKr layers on a bitsandbytes 4-bit base (tests/test_runtime_methods.py covers the hub
# there against a dequantized merge instead).
NF4_CASES = ["lora", "rslora_patterns", "dora", "adalora", "ia3", "oft", "boft"]


@pytest.fixture(scope="module")
def fp32(smollm2_dir):
    return load_base(smollm2_dir)


@pytest.fixture(scope="module")
def nf4(smollm2_dir):
    return load_base(smollm2_dir, quantize="nf4")


@pytest.fixture(scope="module")
def adapter_dirs(cache_dir, fp32):
    """Each case's PEFT-made adapter folder, made once and kept in the test cache."""
    root = cache_dir / "runtime-adapters" / f"smollm2-peft-{peft.__version__}"
    folders = {}
    for case, config in CASES.items():
        folder = root / case
        if not (folder / "adapter_model.safetensors").exists():
            peft_adapter(fp32.model, config(), folder, seed=7)
        folders[case] = folder
    return folders


@pytest.fixture(scope="module")
def inputs(fp32):
    tokenizer = fp32.tokenizer
    tokenizer.padding_side = "left"
    return tokenizer(["The capital of France is", "Write a haiku about the sea:"], return_tensors="pt",
                     padding=True)


def compare(base, folder, inputs):
    with torch.no_grad():
        before = base.model(**inputs).logits
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), folder).eval()
    generate = dict(max_new_tokens=5, do_sample=False, pad_token_id=base.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    expected_tokens = peft_model.generate(**inputs, **generate)
    del peft_model
    handle = attach(base.model, read_adapter(folder), name="under-test", base_fingerprint=base.fingerprint)
    try:
        with torch.no_grad():
            got = base.model(**inputs).logits
        got_tokens = base.model.generate(**inputs, **generate)
    finally:
        handle.detach()
    with torch.no_grad():
        after = base.model(**inputs).logits
    assert (expected - before).abs().max() > 1e-3, "the adapter must change the model"
    assert (got - expected).abs().max() <= 1e-4
    assert torch.equal(got_tokens, expected_tokens)
    assert torch.equal(after, before)


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_peft(case, fp32, adapter_dirs, inputs):
    compare(fp32, adapter_dirs[case], inputs)


@pytest.mark.parametrize("case", NF4_CASES)
def test_nf4_matches_peft_on_the_same_quantized_base(case, nf4, adapter_dirs, inputs):
    compare(nf4, adapter_dirs[case], inputs)
