"""Training: every trainable method learns on a tiny Llama, trains only its own tensors, leaves the base exactly as
it was, and round-trips through the files (and through PEFT, for the methods PEFT knows); the same seed gives the
same digest; bad inputs fail with one line. Slow: QLoRA on SmolLM2-nf4 after an evaluation pass, and the task
experts against the base."""

from __future__ import annotations

import json
import string
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama_config
from peft import PeftModel, get_peft_config, get_peft_model
from torch import nn

from hub.data import Example, collate, encode, read_jsonl
from hub.errors import Incompatible, InvalidArtifact
from hub.evaluate import evaluate
from hub.fingerprint import fingerprint
from hub.formats import adapter_digest, read_adapter, write_adapter
from hub.methods.table import trainable_names, trainer
from hub.runtime import attach, load_base
from hub.sites import base_weight, sites
from hub.train import Recipe, completion_loss, new_adapter, train

warnings.filterwarnings("ignore", message=".*(Merge|Unmerge|right-padding|CUDA extension).*")

# Weights ten times transformers' default init: with the default, a tiny random model's logits are too flat (its
# final norm caps them) for the smaller adapters to move the loss in a few steps.
INIT_RANGE = 0.2


def tiny_recipe(method: str, **fields: Any) -> Recipe:
    return Recipe(method=method, **{"steps": 20, "batch_size": 4, "warmup": 2, **fields})


# One recipe per case: every trainable method, the LoRA variants separately (learning rates for this tiny model;
# soft prompts learn more slowly than anything acting on the layers).
RECIPES = {
    "lora": tiny_recipe("lora", rank=4),
    "rslora": tiny_recipe("lora", rank=4, options={"use_rslora": True}),
    "dora": tiny_recipe("dora", rank=4),
    "loha": tiny_recipe("loha", rank=4, lr=2e-2),
    "lokr": tiny_recipe("lokr", rank=1, lr=5e-2, options={"decompose_both": True}),  # w1 and w2 factored
    "lokr_whole": tiny_recipe("lokr", rank=4, lr=2e-2),  # rank too high to factor: whole w1, w2
    "ia3": tiny_recipe("ia3", lr=0.2),
    "prompt_tuning": tiny_recipe("prompt_tuning", steps=40, lr=0.1, options={"num_virtual_tokens": 8}),
    "prefix_tuning": tiny_recipe("prefix_tuning", steps=40, lr=0.1, options={"num_virtual_tokens": 4}),
    "bottleneck": tiny_recipe("bottleneck", lr=1e-2, options={"bottleneck_size": 8, "placement": "houlsby"}),
    "bitfit": tiny_recipe("bitfit", lr=3e-2),
    "ln_tuning": tiny_recipe("ln_tuning", lr=0.1),
    "denselora": tiny_recipe("denselora", rank=4, lr=2e-2),
}
PEFT_KNOWS = ["lora", "rslora", "dora", "loha", "lokr", "lokr_whole", "ia3", "prompt_tuning", "prefix_tuning",
              "ln_tuning"]
STARTS_AS_NO_OP = [case for case in RECIPES if case not in ("prompt_tuning", "prefix_tuning")]


def char_tokenizer(*, bos: bool = False) -> Any:
    """A character-level tokenizer (99 tokens: pad, EOS, unknown, BOS, printable ASCII) for tiny models; with
    ``bos`` it starts every text with BOS, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3, **{c: i + 4 for i, c in enumerate(string.printable[:95])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>")


def tiny_llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(initializer_range=INIT_RANGE)).eval().requires_grad_(False)


def tiny_data(count: int = 16) -> list[Example]:
    """Prompts of varying length, one fixed answer: any adapter can learn it."""
    return [Example(prompt=f"q{'x' * (i % 5)}{i}:", completion=" yes") for i in range(count)]


def changed(recipe: Recipe, **changes: Any) -> Recipe:
    return Recipe.from_dict({**recipe.to_dict(), **changes})


def logits(model: nn.Module, tokenizer: Any, examples: list[Example]) -> torch.Tensor:
    batch = [encode(tokenizer, e, max_length=128) for e in examples]
    ids, _, mask = collate(batch, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return char_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# Every method trains


@pytest.mark.parametrize("case", list(RECIPES))
def test_every_method_learns_and_leaves_the_base_as_it_was(case: str, tokenizer: Any) -> None:
    model, data = tiny_llama(), tiny_data()
    base = fingerprint(model)
    modules = {name: type(m) for name, m in model.named_modules()}
    before = evaluate(model, tokenizer, data, generate=False, progress=False).loss

    result = train(model, tokenizer, data, RECIPES[case], progress=False)

    assert fingerprint(model) == base
    assert {name: type(m) for name, m in model.named_modules()} == modules and not sites(model)
    assert not model.training and all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert len(result.losses) == RECIPES[case].steps and result.recipe == RECIPES[case]
    handle = attach(model, result.adapter)
    after = evaluate(model, tokenizer, data, generate=False, progress=False).loss
    handle.detach()
    assert after < 0.6 * before, f"{case}: loss {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("case", list(RECIPES))
def test_only_the_adapter_gets_gradients(case: str, tokenizer: Any) -> None:
    model, data = tiny_llama(), tiny_data(4)
    other = attach(model, new_adapter(model, Recipe(method="lora", rank=2, seed=5)), name="other")
    handle = attach(model, new_adapter(model, RECIPES[case]), name="trained")
    params = handle.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    ids, labels, mask = collate([encode(tokenizer, e, max_length=128) for e in data], pad_id=0, left=True)
    completion_loss(model.train(), ids, labels, mask).backward()
    model.eval()
    assert all(p.grad is not None for p in params) and any(bool(p.grad.abs().sum()) for p in params)
    frozen = [*model.parameters(), *other.parameters()]
    trained = {id(p) for p in params}
    assert all(p.grad is None and not p.requires_grad for p in frozen if id(p) not in trained)
    handle.detach()
    other.detach()


@pytest.mark.parametrize("case", STARTS_AS_NO_OP)
def test_fresh_adapters_start_as_the_base(case: str, tokenizer: Any) -> None:
    model, data = tiny_llama(), tiny_data(4)
    expected = logits(model, tokenizer, data)
    handle = attach(model, new_adapter(model, RECIPES[case]))
    assert torch.allclose(logits(model, tokenizer, data), expected, atol=1e-6)
    handle.detach()


@pytest.mark.parametrize("case", ["lora", "dora", "loha", "lokr", "lokr_whole", "ia3", "prefix_tuning"])
def test_fresh_adapters_have_peft_layout_and_init(case: str, tmp_path: Path) -> None:
    """PEFT, given our config, builds the same tensors: same keys and shapes, zero where PEFT's are zero, and the
    deterministic parts (DoRA magnitudes, IA3 ones) equal."""
    model = tiny_llama()
    ours = new_adapter(model, RECIPES[case])
    get_peft_model(tiny_llama(), get_peft_config({**ours.config, "inference_mode": False})).save_pretrained(tmp_path)
    theirs = read_adapter(tmp_path)
    shapes = {key: tuple(tensor.shape) for key, tensor in theirs.tensors.items()}
    assert {key: tuple(tensor.shape) for key, tensor in ours.tensors.items()} == shapes
    for key, tensor in ours.tensors.items():
        assert bool(tensor.any()) == bool(theirs.tensors[key].any()), key
        if key.endswith(("lora_magnitude_vector", "ia3_l")):
            assert torch.allclose(tensor, theirs.tensors[key], atol=1e-6), key
        if key.endswith(("lora_A.weight", "hada_w1_b", "lokr_w1_b")):  # Kaiming-uniform with a = √5: ±1/√fan_in
            bound = tensor.shape[1] ** -0.5
            assert tensor.abs().max() <= bound and theirs.tensors[key].abs().max() <= bound, key


@pytest.mark.parametrize("case", list(RECIPES))
def test_trained_adapters_round_trip_through_the_files_and_peft(case: str, tokenizer: Any, tmp_path: Path) -> None:
    model, data = tiny_llama(), tiny_data(8)
    adapter = train(model, tokenizer, data, changed(RECIPES[case], steps=6), progress=False).adapter
    handle = attach(model, adapter)
    expected = logits(model, tokenizer, data)
    again = handle.to_adapter()
    handle.detach()
    assert adapter_digest(again) == adapter_digest(adapter)

    folder = write_adapter(adapter, tmp_path / case)
    read = read_adapter(folder)
    assert adapter_digest(read) == adapter_digest(adapter)
    fresh = tiny_llama()
    attach(fresh, read)
    assert torch.equal(logits(fresh, tokenizer, data), expected)
    if case in PEFT_KNOWS:
        peft_model = PeftModel.from_pretrained(tiny_llama(), folder).eval()
        assert (logits(peft_model, tokenizer, data) - expected).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def tiny_nf4(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("tiny-nf4")
    tiny_llama().save_pretrained(folder)
    return load_base(folder, quantize="nf4")


@pytest.mark.parametrize("case", ["lora", "dora", "loha", "lokr", "ia3", "prompt_tuning"])
def test_training_on_a_4bit_base_after_an_evaluation_pass(case: str, tiny_nf4: Any, tokenizer: Any) -> None:
    model, data = tiny_nf4.model, tiny_data()
    before = evaluate(model, tokenizer, data, progress=False).loss  # generates too: the eval pass of the CPU trap
    result = train(model, tokenizer, data, RECIPES[case], progress=False)
    handle = attach(model, result.adapter)
    after = evaluate(model, tokenizer, data, generate=False, progress=False).loss
    handle.detach()
    assert after < 0.6 * before, f"{case}: loss {before:.3f} -> {after:.3f}"
    if case == "dora":  # the magnitude starts as the row norms of the weight bitsandbytes dequantizes
        fresh = new_adapter(model, RECIPES[case]).tensors
        layer = model.model.layers[0].self_attn.q_proj
        magnitude = fresh["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
        assert torch.allclose(magnitude, torch.linalg.norm(base_weight(layer), dim=1))


def test_handles_of_every_lora_family_method_write_back_what_they_read(tmp_path: Path) -> None:
    from runtime_peft import LLAMA_CASES, peft_adapter
    from runtime_peft import tiny_llama as peft_tiny_llama

    model = peft_tiny_llama()
    for case, config in LLAMA_CASES.items():
        _, adapter = peft_adapter(model, config(), tmp_path / case)
        handle = attach(model, adapter, name=case)
        written = handle.to_adapter()
        handle.detach()
        assert written.config == adapter.config, case
        # PEFT saves the base's own embedding beside an embedding LoRA; the handle leaves that copy out.
        expected = {k: v for k, v in adapter.tensors.items() if not k.endswith("embed_tokens.base_layer.weight")}
        assert written.tensors.keys() == expected.keys(), case
        for key, tensor in expected.items():
            assert written.tensors[key].dtype == tensor.dtype and torch.equal(written.tensors[key], tensor), key


# ---------------------------------------------------------------------------------------------------------------
# The loop


def test_same_seed_same_digest(tokenizer: Any) -> None:
    recipe = changed(RECIPES["lora"], steps=8, options={"dropout": 0.1})  # dropout: the run draws random numbers too
    digests = [adapter_digest(train(tiny_llama(), tokenizer, tiny_data(), recipe, progress=False).adapter)
               for _ in range(2)]
    other = adapter_digest(train(tiny_llama(), tokenizer, tiny_data(), changed(recipe, seed=1), progress=False).adapter)
    assert digests[0] == digests[1] != other


def test_gradient_accumulation_is_a_larger_batch(tokenizer: Any) -> None:
    whole = train(tiny_llama(), tokenizer, tiny_data(), changed(RECIPES["lora"], steps=5, batch_size=8),
                  progress=False)
    accumulated = train(tiny_llama(), tokenizer, tiny_data(),
                        changed(RECIPES["lora"], steps=5, batch_size=4, grad_accum=2), progress=False)
    assert accumulated.losses == pytest.approx(whole.losses, rel=1e-5)
    for key, tensor in whole.adapter.tensors.items():
        assert torch.allclose(accumulated.adapter.tensors[key], tensor, atol=1e-5), key


def test_the_loss_counts_completions_only_whatever_the_padding(tokenizer: Any) -> None:
    model, data = tiny_llama(), tiny_data(6)
    encoded = [encode(tokenizer, e, max_length=128) for e in data]
    ids, labels, mask = collate(encoded, pad_id=0, left=True)
    ours = completion_loss(model, ids, labels, mask)
    reference = sum(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
                    * sum(label != -100 for label in e.labels[1:]) for e in encoded)
    assert torch.allclose(ours, reference, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Recipes


def test_recipes_are_complete_json_and_come_back() -> None:
    recipe = Recipe(method="lora", targets=["q_proj", "v_proj"], options={"use_rslora": True})
    data = recipe.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["targets"] == ["q_proj", "v_proj"] and data["lr"] == 5e-3  # the method's default, recorded
    assert set(data) == {f for f in Recipe.__dataclass_fields__}
    assert Recipe.from_dict(data) == recipe


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "vera"}, "cannot train method 'vera'"),
        ({"options": {"alpha_pattern": {}}}, "unknown lora option alpha_pattern"),
        ({"options": {"dropout": float("nan")}}, "not JSON-serialisable"),
        ({"options": {"dropout": object()}}, "not JSON-serialisable"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"warmup": -1}, "warmup must be a non-negative integer"),
        ({"targets": "q_proj"}, "not the string 'q_proj'"),
    ],
)
def test_bad_recipes_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArtifact, match=message):
        Recipe(**changes)
    with pytest.raises(InvalidArtifact, match="unknown recipe field"):
        Recipe.from_dict({"method": "lora", "epochs": 3})


@pytest.mark.parametrize("name", trainable_names())
def test_a_recipe_takes_its_methods_defaults_and_records_the_values_used(name: str) -> None:
    # What `hub train NAME --method M` trains with when no --steps/--lr is given (chosen per method by
    # bench/bench_train_tasks.py --methods all) and what the registry records with the version.
    method, _ = trainer(name)
    recipe = Recipe.from_dict({"method": name})
    used = {"steps": method.default_steps, "lr": method.default_lr, "warmup": method.default_warmup}
    assert {key: recipe.to_dict()[key] for key in used} == used
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    given = {"steps": 3, "lr": 1e-3, "warmup": 0}
    assert {key: Recipe(method=name, **given).to_dict()[key] for key in given} == given


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, the model untouched


@pytest.mark.parametrize(
    ("recipe", "error", "message"),
    [
        (Recipe(targets=("q_proj", "qq_proj")), Incompatible, "LoRA: LlamaForCausalLM has no module named qq_proj"),
        (Recipe(method="loha", targets=("norm",)), Incompatible, "model.norm is a LlamaRMSNorm, not a linear"),
        (Recipe(method="ia3", targets=("k_proj",), options={"feedforward": ["down_proj"]}), InvalidArtifact,
         r"feedforward modules \['down_proj'\] are not targets"),
        (Recipe(method="ln_tuning", targets=("q_proj",)), Incompatible, "no normalization layer named q_proj"),
        (Recipe(method="prompt_tuning", options={"init": "text"}), InvalidArtifact, "needs init_text"),
        (Recipe(rank=0), InvalidArtifact, "rank must be at least 1"),
    ],
)
def test_adapters_that_cannot_be_made_are_refused(recipe: Recipe, error: type, message: str, tokenizer: Any) -> None:
    model = tiny_llama()
    modules = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(error, match=message):
        train(model, tokenizer, tiny_data(), recipe, progress=False)
    assert {name: type(m) for name, m in model.named_modules()} == modules


def test_bad_training_sets_are_refused(tokenizer: Any) -> None:
    model = tiny_llama()
    with pytest.raises(InvalidArtifact, match="the training set is empty"):
        train(model, tokenizer, [], progress=False)
    too_long = [*tiny_data(2), Example(prompt="x" * 120, completion=" too long")]
    with pytest.raises(InvalidArtifact, match=r"^example 2 has 130 tokens, longer than the model's context of 128$"):
        train(model, tokenizer, too_long, progress=False)
    assert not sites(model)


# ---------------------------------------------------------------------------------------------------------------
# Data files

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat_lines_follow_the_tokenizers_template(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(chat) + "\n\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    templated, plain = read_jsonl(path, tokenizer=tokenizer)
    assert templated == Example(prompt="<system>Be brief.</s><user>2+2?</s><assistant>", completion="4")
    assert plain == Example(prompt="a", completion="b")
    # Without a template: a plain role-tagged rendering, still masking everything before the answer.
    untemplated = read_jsonl(path)[0]
    assert untemplated.completion == "4" and untemplated.prompt.endswith("<|assistant|>\n")
    # A template that writes the BOS its tokenizer adds anyway: encoded, the prompt starts with one BOS, not two.
    with_bos = char_tokenizer(bos=True)
    with_bos.chat_template = "<s>" + CHAT_TEMPLATE
    example = read_jsonl(path, tokenizer=with_bos)[0]
    ids = encode(with_bos, example, max_length=128).input_ids
    assert ids[:2] == [3, with_bos.convert_tokens_to_ids("<")] and ids.count(3) == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a", "completion": "b"}', "{oops"], r"bad\.jsonl:2: not valid JSON"),
        (['{"prompt": "a", "completion": "b"}', "", '{"prompt": "a"}'], r"bad\.jsonl:3: needs string fields"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], r"bad\.jsonl:1: the last message must be"),
        (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}'],
         r"bad\.jsonl:1: the assistant's answer is empty"),
        (['{"messages": [{"role": "user"}]}'], r"bad\.jsonl:1: every message needs"),
        (["", "  "], r"bad\.jsonl holds no examples"),
    ],
)
def test_malformed_data_files_name_the_line(lines: list[str], message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidArtifact, match=message):
        read_jsonl(path, tokenizer=char_tokenizer())


def test_data_files_must_be_utf8_and_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(InvalidArtifact, match=r"^\S*bad\.jsonl:2: not UTF-8 text$"):
        read_jsonl(path)
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')
    assert read_jsonl(path) == [Example(prompt="a", completion="b")]


def test_an_example_far_longer_than_the_context_is_refused_without_tokenizing_it_all(tokenizer: Any) -> None:
    # 20 MB of text: tokenized whole, the char tokenizer would take minutes and gigabytes before the refusal.
    huge = Example(prompt="x" * 20_000_000, completion=" y")
    with pytest.raises(InvalidArtifact, match=r"^example 0 has more than 128 tokens, longer than the model's context "
                                              r"of 128 \(20000000 characters\)$"):
        encode(tokenizer, huge, max_length=128, index=0)


def test_examples_must_be_examples(tokenizer: Any) -> None:
    with pytest.raises(InvalidArtifact, match=r"^example 3 is a dict, not a hub.data.Example\(prompt, completion\)$"):
        encode(tokenizer, {"prompt": "a", "completion": "b"}, max_length=128, index=3)


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2 on nf4 (slow)


@pytest.mark.slow
def test_chat_lines_follow_smollm2s_template(smollm2_dir: Path, tmp_path: Path) -> None:
    from hub.runtime import load_tokenizer

    path = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    example = read_jsonl(path, tokenizer=load_tokenizer(smollm2_dir))[0]
    assert example.prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert example.completion == "hello there"


@pytest.mark.slow
def test_qlora_training_after_an_evaluation_pass_still_learns(smollm2_nf4: Any) -> None:
    """The bitsandbytes CPU trap (docs/architecture.md): an evaluation pass under no_grad must not switch the 4-bit
    layers to a kernel without autograd; training afterwards must still reach every adapted layer and learn."""
    from bitsandbytes.nn import Linear4bit

    from hub.tasks import examples

    model, tokenizer = smollm2_nf4.model, smollm2_nf4.tokenizer
    evaluate(model, tokenizer, examples("date", "test", 4), progress=False)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)

    handle = attach(model, new_adapter(model, Recipe()), name="probe")
    try:
        data = [encode(tokenizer, e, max_length=2048) for e in examples("date", "train", 2)]
        ids, labels, mask = collate(data, pad_id=tokenizer.pad_token_id, left=True)
        params = handle.trainable_parameters()
        completion_loss(model.train(), ids, labels, mask).backward()
        # B starts at zero, so B is where the first gradient must arrive, through every frozen 4-bit layer above.
        assert all(float(d.lora_B.grad.abs().sum()) > 0 for d in handle.deltas())
        assert all(p.grad is None for p in model.parameters() if id(p) not in {id(q) for q in params})
    finally:
        model.eval()
        handle.detach()

    result = train(model, tokenizer, examples("date", "train", 64), Recipe(steps=5, batch_size=4), progress=False)
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses


@pytest.mark.slow
def test_task_experts_beat_the_base_by_a_wide_margin(smollm2_nf4: Any, task_experts: dict[str, Any]) -> None:
    from hub.tasks import TASKS, examples

    model, tokenizer = smollm2_nf4.model, smollm2_nf4.tokenizer
    assert set(task_experts) == set(TASKS)
    scores = {}
    for task, expert in task_experts.items():
        test = examples(task, "test", 20)
        base = evaluate(model, tokenizer, test, batch_size=20, progress=False).exact_match
        handle = attach(model, expert, name=f"expert-{task}")
        try:
            trained = evaluate(model, tokenizer, test, batch_size=20, progress=False).exact_match
        finally:
            handle.detach()
        scores[task] = (base, trained)
    assert all(trained >= 0.8 and trained - base >= 0.6 for base, trained in scores.values()), scores
