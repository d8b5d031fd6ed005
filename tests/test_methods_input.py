"""Prompt tuning, P-tuning, prefix tuning and LayerNorm tuning: PEFT makes and saves the adapters, the hub reads and
attaches them, and the model must compute what PEFT computes; detaching must leave the base exactly as it was."""

from __future__ import annotations

import copy
import hashlib
import importlib
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn

from hub.errors import Incompatible
from hub.formats import Adapter, read_adapter, write_adapter
from hub.methods import _virtual_tokens, ln_tuning

PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def tiny_llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def peft_config(method: str, task_type: str):
    from peft import LNTuningConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if method == "prompt_tuning":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=4)
    if method == "p_tuning":
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=4, encoder_hidden_size=24)
    if method == "prefix_tuning":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=3)
    return LNTuningConfig(task_type=task_type)


def save_peft_adapter(model: nn.Module, method: str, folder: Path, *, seed: int = 0,
                      task_type: str = "CAUSAL_LM") -> Path:
    """Make a PEFT adapter on ``model`` with weights far from a no-op, and save it as PEFT does."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, peft_config(method, task_type))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if method == "prompt_tuning":
            # Real token embeddings plus noise: a prompt in the model's own embedding range.
            table = model.get_input_embeddings().weight
            rows = torch.randint(0, table.shape[0], (4,), generator=generator)
            weight = peft_model.prompt_encoder["default"].embedding.weight
            weight.copy_(table[rows] + 0.02 * torch.randn(weight.shape, generator=generator))
        elif method == "ln_tuning":
            for name, param in peft_model.named_parameters():
                if "ln_tuning_layers" in name:
                    param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(folder)
    return folder


def load_peft(model: nn.Module, folder: Path) -> nn.Module:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, folder).eval()


def attach(model: nn.Module, adapter: Adapter, *, name: str = "a", weight: float = 1.0):
    module = importlib.import_module(f"hub.methods.{adapter.method}")
    return module.attach(model, adapter, name=name, weight=weight)


def state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        path: (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_hooks_always_called),
               len(m._forward_pre_hooks_with_kwargs))
        for path, m in model.named_modules()
    }


def batch() -> dict[str, torch.Tensor]:
    """Two rows, the second left-padded: masks and positions must be extended correctly for both."""
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def generate(model: nn.Module, inputs: dict[str, torch.Tensor], *, pad_token_id: int = 0, **options) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pad_token_id, **options)


def greedy_without_cache(model: nn.Module, inputs: dict[str, torch.Tensor], *, steps: int = 6,
                         pad_token_id: int = 0) -> torch.Tensor:
    """What ``generate(max_new_tokens=steps, do_sample=False)`` returns, computed by recomputing the whole sequence
    through ``forward`` at every step (positions from the mask, as generate derives them). PEFT 0.21.2's own
    ``generate`` passes its soft prompts and prefixes under the KV-cache argument name transformers 5.24 renamed
    (past_key_values -> cache), so its forward, not its generate, is the oracle."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            token = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
            token = token.masked_fill(done, pad_token_id)
            done |= torch.tensor([int(t) in eos for t in token])
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if done.all():
                break
    return ids


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2 against PEFT, one test per PEFT method


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> nn.Module:
    """SmolLM2 in fp32, loaded once for this module: every test leaves it exactly as it found it (and checks so)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning", "ln_tuning"])
def test_smollm2_matches_peft(method: str, smollm2: nn.Module, smollm2_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.padding_side = "left"
    inputs = dict(tokenizer(["The capital of France is", "Two plus two equals"], return_tensors="pt", padding=True))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    folder = save_peft_adapter(copy.deepcopy(smollm2), method, tmp_path / method)
    oracle = load_peft(copy.deepcopy(smollm2), folder)
    expected = logits(oracle, inputs)
    expected_tokens = greedy_without_cache(oracle, inputs, pad_token_id=pad)
    del oracle

    base = smollm2
    before = logits(base, inputs)
    before_hash = state_hash(base)
    handle = attach(base, read_adapter(folder), name=method)
    try:  # detached whatever happens: the model is shared by this module's tests
        got = logits(base, inputs)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-4
        assert not torch.allclose(got[:, -before.shape[1]:], before, atol=1e-3)  # the adapter really acts
        assert torch.equal(generate(base, inputs, pad_token_id=pad), expected_tokens)
    finally:
        handle.detach()
    assert torch.equal(logits(base, inputs), before)
    assert state_hash(base) == before_hash


# ---------------------------------------------------------------------------------------------------------------
# Tiny models against PEFT, and the KV cache


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_tiny_models_match_peft_with_padding_and_cache(family: str, method: str, tmp_path: Path) -> None:
    make = tiny_llama if family == "llama" else tiny_gpt2
    folder = save_peft_adapter(make(), method, tmp_path / "adapter")
    oracle = load_peft(make(), folder)
    inputs = batch()
    model = make()
    handle = attach(model, read_adapter(folder))
    assert (logits(model, inputs) - logits(oracle, inputs)).abs().max().item() <= 1e-5
    cached = generate(model, inputs)
    assert torch.equal(cached, greedy_without_cache(oracle, inputs))
    # The cache path (virtual tokens only on the first step) gives what recomputing everything gives.
    assert torch.equal(cached, generate(model, inputs, use_cache=False))
    handle.detach()


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_bert_encoder_matches_peft(method: str, tmp_path: Path) -> None:
    folder = save_peft_adapter(tiny_bert(), method, tmp_path / "adapter", task_type="FEATURE_EXTRACTION")
    oracle = load_peft(tiny_bert(), folder)
    model = tiny_bert()
    attach(model, read_adapter(folder))
    with torch.no_grad():
        expected, got = oracle(**batch()).last_hidden_state, model(**batch()).last_hidden_state
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_labels_are_extended_so_the_loss_counts_real_tokens_only(tmp_path: Path) -> None:
    folder = save_peft_adapter(tiny_llama(), "prompt_tuning", tmp_path / "adapter")
    oracle = load_peft(tiny_llama(), folder)
    model = tiny_llama()
    attach(model, read_adapter(folder))
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ours = model(**inputs, labels=labels).loss
        theirs = oracle(**inputs, labels=labels).loss
    assert torch.isclose(ours, theirs, atol=1e-6)


def test_prompt_tuning_on_bert_prepends_embeddings() -> None:
    model = tiny_bert()
    prompt = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    adapter = Adapter(config={"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 32},
                      tensors={"prompt_embeddings": prompt})
    inputs = batch()
    inputs["token_type_ids"] = torch.ones_like(inputs["input_ids"])
    attach(model, adapter)
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
    handle_free = tiny_bert()
    embeds = torch.cat((prompt.expand(2, -1, -1), handle_free.get_input_embeddings()(inputs["input_ids"])), dim=1)
    with torch.no_grad():
        expected = handle_free(
            inputs_embeds=embeds,
            attention_mask=torch.cat((torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]), dim=1),
            token_type_ids=torch.cat((torch.zeros(2, 3, dtype=torch.long), inputs["token_type_ids"]), dim=1),
        ).last_hidden_state
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------------
# Several adapters at once


def _prompt(method: str, rows: torch.Tensor, model: nn.Module) -> Adapter:
    config = {"peft_type": method.upper(), "num_virtual_tokens": rows.shape[0]}
    if method == "prefix_tuning":
        config.update(num_layers=2, token_dim=16, num_attention_heads=2)
    return Adapter(config=config, tensors={"prompt_embeddings": rows})


def test_two_prompts_concatenate_in_attach_order() -> None:
    generator = torch.Generator().manual_seed(5)
    first, second = torch.randn(2, 32, generator=generator), torch.randn(3, 32, generator=generator)
    inputs = batch()
    together = tiny_llama()
    attach(together, _prompt("prompt_tuning", first, together), name="first")
    attach(together, _prompt("p_tuning", second, together), name="second")
    single = tiny_llama()
    attach(single, _prompt("prompt_tuning", torch.cat((first, second)), single), name="both")
    assert torch.equal(logits(together, inputs), logits(single, inputs))
    assert torch.equal(generate(together, inputs), generate(single, inputs))


def test_two_prefixes_concatenate_and_compose_with_a_prompt() -> None:
    generator = torch.Generator().manual_seed(6)
    a, b = torch.randn(2, 64, generator=generator), torch.randn(3, 64, generator=generator)
    prompt = torch.randn(2, 32, generator=generator)
    inputs = batch()
    together = tiny_llama()
    attach(together, _prompt("prefix_tuning", a, together), name="a")
    attach(together, _prompt("prompt_tuning", prompt, together), name="p")
    attach(together, _prompt("prefix_tuning", b, together), name="b")
    single = tiny_llama()
    attach(single, _prompt("prefix_tuning", torch.cat((a, b)), single), name="ab")
    attach(single, _prompt("prompt_tuning", prompt, single), name="p")
    assert torch.equal(logits(together, inputs), logits(single, inputs))
    tokens = generate(together, inputs)
    assert torch.equal(tokens, generate(single, inputs))
    assert torch.equal(tokens, generate(together, inputs, use_cache=False))


def test_all_input_methods_together_detach_in_any_order(tmp_path: Path) -> None:
    model = tiny_llama()
    inputs = batch()
    before, before_hash, before_hooks = logits(model, inputs), state_hash(model), hook_counts(model)
    handles = [attach(model, read_adapter(save_peft_adapter(tiny_llama(), m, tmp_path / m)), name=m)
               for m in (*PROMPT_METHODS, "ln_tuning")]
    generate(model, inputs)
    for handle in (handles[2], handles[0], handles[3], handles[1]):
        handle.detach()
    assert torch.equal(logits(model, inputs), before)
    assert state_hash(model) == before_hash
    assert hook_counts(model) == before_hooks


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm tuning


def test_ln_tuning_weights_scale_the_change_and_leave_parameters_alone(tmp_path: Path) -> None:
    adapter = read_adapter(save_peft_adapter(tiny_llama(), "ln_tuning", tmp_path / "ln"))
    model = tiny_llama()
    inputs = batch()
    before, params_before = logits(model, inputs), {n: p for n, p in model.named_parameters()}
    handle = attach(model, adapter, weight=0.0)
    assert torch.equal(logits(model, inputs), before)
    handle.set_weight(1.0)
    full = logits(model, inputs)
    handle.set_weight(0.5)
    half = logits(model, inputs)
    assert not torch.allclose(full, before, atol=1e-3)
    assert 0 < (half - before).abs().max() < (full - before).abs().max()
    # The model's parameters are the same objects with the same values while the adapter is attached.
    assert {n: p for n, p in model.named_parameters()} == params_before
    handle.detach()
    assert torch.equal(logits(model, inputs), before)


def test_ln_tuning_written_by_the_hub_loads_in_peft(tmp_path: Path) -> None:
    model = tiny_llama()
    adapter = ln_tuning.new_adapter(model)
    handle = attach(model, adapter)
    inputs = batch()
    assert torch.equal(logits(model, inputs), logits(tiny_llama(), inputs))  # a fresh adapter is the identity
    with torch.no_grad():
        for param in handle.parameters():
            param.mul_(1.5)
    folder = write_adapter(handle.to_adapter(), tmp_path / "ln")
    oracle = load_peft(tiny_llama(), folder)
    assert (logits(oracle, inputs) - logits(model, inputs)).abs().max().item() <= 1e-5
    assert read_adapter(folder).spec.targets == ("input_layernorm", "norm", "post_attention_layernorm")


def test_trained_prompt_round_trips_through_the_files_and_peft(tmp_path: Path) -> None:
    folder = save_peft_adapter(tiny_llama(), "prompt_tuning", tmp_path / "adapter")
    model = tiny_llama().requires_grad_(False)
    handle = attach(model, read_adapter(folder))
    optimizer = torch.optim.Adam(handle.trainable_parameters(), lr=0.05)
    inputs = batch()
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in model.parameters())
    written = write_adapter(handle.to_adapter(), tmp_path / "trained")
    assert (logits(load_peft(tiny_llama(), written), inputs) - logits(model, inputs)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one-line errors, nothing changed


def _unchanged(model: nn.Module, before: torch.Tensor, hooks: dict) -> None:
    assert torch.equal(logits(model, batch()), before)
    assert hook_counts(model) == hooks
    assert model not in _virtual_tokens._CONTROLLERS


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        (Adapter(config={"peft_type": "PROMPT_TUNING"}, tensors={"prompt_embeddings": torch.zeros(2, 16)}),
         "dimension 16, the model's input embeddings 32"),
        (Adapter(config={"peft_type": "PREFIX_TUNING", "num_layers": 3, "token_dim": 16, "num_attention_heads": 2},
                 tensors={"prompt_embeddings": torch.zeros(2, 96)}), "has 3 layers, the model 2"),
        (Adapter(config={"peft_type": "PREFIX_TUNING", "num_layers": 2, "token_dim": 32, "num_attention_heads": 4},
                 tensors={"prompt_embeddings": torch.zeros(2, 128)}), "key/value dimension 32 in 4 heads"),
        (Adapter(config={"peft_type": "LN_TUNING"},
                 tensors={"base_model.model.model.layers.7.input_layernorm.ln_tuning_layers.weight": torch.ones(32)}),
         "no module model.layers.7.input_layernorm"),
        (Adapter(config={"peft_type": "LN_TUNING"},
                 tensors={"base_model.model.model.norm.ln_tuning_layers.weight": torch.ones(16)}),
         "model.norm.weight has shape (16,), the model's (32,)"),
        (Adapter(config={"peft_type": "LN_TUNING"},
                 tensors={"base_model.model.model.norm.ln_tuning_layers.bias": torch.ones(32)}),
         "has no parameter bias"),
    ],
)
def test_adapters_that_do_not_fit_are_refused(adapter: Adapter, message: str) -> None:
    model = tiny_llama()
    before, hooks = logits(model, batch()), hook_counts(model)
    with pytest.raises(Incompatible, match=re.escape(message)) as error:
        attach(model, adapter)
    assert "\n" not in str(error.value)
    _unchanged(model, before, hooks)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_methods_refuse_a_weight(method: str, tmp_path: Path) -> None:
    adapter = read_adapter(save_peft_adapter(tiny_llama(), method, tmp_path / method))
    model = tiny_llama()
    before, hooks = logits(model, batch()), hook_counts(model)
    with pytest.raises(Incompatible, match="weight must be 1.0, got 0.5"):
        attach(model, adapter, weight=0.5)
    _unchanged(model, before, hooks)


def test_a_name_attached_twice_is_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    adapter = read_adapter(save_peft_adapter(tiny_llama(), "prompt_tuning", tmp_path / "p"))
    handle = attach(model, adapter, name="same")
    with_one = logits(model, batch())
    with pytest.raises(Incompatible, match="'same' is already attached"):
        attach(model, adapter, name="same")
    assert torch.equal(logits(model, batch()), with_one)
    handle.detach()


# ---------------------------------------------------------------------------------------------------------------
# No leaks


def test_attach_detach_many_times_leaks_nothing(tmp_path: Path) -> None:
    adapters = [read_adapter(save_peft_adapter(tiny_llama(), m, tmp_path / m)) for m in (*PROMPT_METHODS, "ln_tuning")]
    model = tiny_llama()
    inputs = batch()
    before, before_hash, before_hooks = logits(model, inputs), state_hash(model), hook_counts(model)
    attached_once = None
    for round_ in range(20):
        handles = [attach(model, adapter, name=f"{adapter.method}-{round_}") for adapter in adapters]
        out = logits(model, inputs)
        attached_once = out if attached_once is None else attached_once
        assert torch.equal(out, attached_once)
        for handle in reversed(handles):
            handle.detach()
    assert torch.equal(logits(model, inputs), before)
    assert state_hash(model) == before_hash
    assert hook_counts(model) == before_hooks
    assert model not in _virtual_tokens._CONTROLLERS
    assert not any(m in ln_tuning._SITES for m in model.modules())
