"""`hub serve` on the real SmolLM2-135M-Instruct as nf4: 16 concurrent requests (half streaming) over 8 adapters,
a per-request weighted composition and a mixture, each equal token for token to in-process generation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from test_serve import ServerThread, complete, reference

from hub.client import Hub

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "def fibonacci(n):", "My name is",
           "The date today is", "Once upon a time", "The best way to learn is", "Translate to French: cat"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, one_thread: None) -> Hub:
    """Eight random LoRAs on SmolLM2 (different ranks and targets; large enough to change greedy output) and a
    mixture of three of them with a random gate."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hub.composition import compose

    root = tmp_path_factory.mktemp("serve-smollm2")
    hub = Hub(home=root / "home")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    targets = [["q_proj", "v_proj"], ["k_proj", "o_proj"], ["up_proj", "down_proj"], ["q_proj", "gate_proj"]]
    for i in range(8):
        torch.manual_seed(i)
        config = LoraConfig(r=4 * (1 + i % 2), lora_alpha=8, target_modules=targets[i % 4], init_lora_weights=False)
        peft = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        peft.save_pretrained(root / f"e{i}")
        model = peft.unload()
        hub.register(root / f"e{i}", name=f"e{i}", base=smollm2_dir)
    mixture = compose(["e0", "e2", "e4"], kind="mixture", hub=hub)
    mixture.bind(model)
    torch.manual_seed(9)
    with torch.no_grad():
        mixture.module.weight.normal_(0, 0.5)
    mixture.register(hub, name="mix")
    return hub


def test_smollm2_nf4_serves_16_concurrent_requests_like_in_process_generation(
        registry: Hub, smollm2_dir: Path, smollm2_nf4: Any) -> None:
    from hub.composition import compose

    weighted = [{"model": "e1", "weight": 0.7}, {"model": "e6", "weight": 0.3}]
    cases = [(f"e{i}", None) for i in range(8)] + [("mix", None), ("smollm2", weighted), ("smollm2", None),
                                                   ("e3@1", None), ("mix@1", None), ("e5", None), ("e7", None),
                                                   ("e0", None)]
    tokenizer = smollm2_nf4.tokenizer
    with ServerThread(registry, base=str(smollm2_dir), served_model_name="smollm2", quantize="nf4", device="cpu",
                      max_batch=16, max_loaded=12) as server:
        client = server.client()

        def ask(index: int) -> tuple[str, list[int], str]:
            model, adapters = cases[index]
            extra = {"adapters": adapters} if adapters else {}
            return complete(client, model, PROMPTS[index % 8], stream=index % 2 == 1, max_tokens=12, **extra)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(16)))
        steps = server.metric("hub_batch_occupancy_rows_count")
        rows = server.metric("hub_batch_occupancy_rows_sum")
    mismatches = []
    for index, ((model, adapters), (text, ids, _)) in enumerate(zip(cases, answers, strict=True)):
        prompt = tokenizer(PROMPTS[index % 8]).input_ids
        source = None if adapters is None and model == "smollm2" else model
        if adapters:
            source = compose([a["model"] for a in adapters], [a["weight"] for a in adapters], kind="stack",
                             hub=registry)
        expected = reference(smollm2_nf4.model, registry, source, prompt, 12)
        if ids != expected:
            mismatches.append((index, model, text, tokenizer.decode(expected)))
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert mismatches == []
    assert len({tuple(ids) for _, ids, _ in answers}) >= 8
    assert rows / steps > 2  # decoded together
