"""The composition front door (hub.composition): weighted sums, stacks and gated mixtures on tiny random Llamas.

Inputs come from a temporary registry (the hub_home fixture) or memory; adapters are made by PEFT with random
weights. The SmolLM2 acceptance test for mixtures is tests/test_mixture_smollm2.py.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from hubserver import HubServer
from peft import IA3Config, LoHaConfig, LoraConfig, PromptTuningConfig
from runtime_peft import peft_adapter, tiny_llama

from cli.compose import compose as compose_command
from hub import compose
from hub.client import Hub
from hub.composition import Mixture, RouterConfig, Stack, WeightedSum, activate
from hub.data import Example
from hub.errors import Conflict, Incompatible, InvalidArtifact, NotFound
from hub.fingerprint import fingerprint
from hub.formats import Adapter, adapter_digest, read_adapter, write_adapter
from hub.remote import Remote
from hub.runtime import attach, gate_context, load_base

TOKENS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    model = tiny_llama()
    model.hub_fingerprint = fingerprint(model)
    return model


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory) -> dict[str, Adapter]:
    root = tmp_path_factory.mktemp("compose-adapters")
    configs = {
        "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        "b": LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj"],
                        init_lora_weights=False),
        "c": LoHaConfig(r=4, alpha=4, target_modules=["v_proj", "up_proj"], init_weights=False),
        "d": LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"], init_lora_weights=False),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "prompt": PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    }
    return {name: peft_adapter(model, config, root / name, seed=i + 1)[1] for i, (name, config) in
            enumerate(configs.items())}


@pytest.fixture
def hub(hub_home, model, adapters) -> Hub:
    """A fresh registry with every test adapter registered once as NAME@1, on the tiny model's base."""
    hub = Hub()
    for name, adapter in adapters.items():
        hub.register(adapter, name=name, base=model.hub_fingerprint)
    return hub


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def randomize_gate(mixture: Mixture, *, scale: float = 1.0, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in mixture.module.parameters():
            param.copy_(scale * torch.randn(param.shape, generator=generator))


# ---------------------------------------------------------------------------------------------------------------
# Weighted sums


def test_the_front_door_is_the_package_top_level():
    import hub as package
    from hub import composition

    assert (package.compose, package.activate, package.Hub) == (composition.compose, composition.activate, Hub)
    with pytest.raises(AttributeError, match="no attribute 'merge'"):
        package.merge  # noqa: B018


def test_sum_from_refs_registers_with_lineage_and_reproduces(hub, model):
    merged = compose(["a@1", "b", "c@latest"], [0.7, -0.3, 1.5], strategy="svd", rank=6, hub=hub)
    assert isinstance(merged, WeightedSum) and merged.adapter.method == "lora"
    version = merged.register(hub, name="abc", tags=["merged"]).version
    assert version.method == "lora" and version.base == model.hub_fingerprint
    assert [(p.ref, p.weight, p.strategy) for p in version.parents] == [("a@1", 0.7, "svd"), ("b@1", -0.3, "svd"),
                                                                        ("c@1", 1.5, "svd")]
    assert version.parents[0].params == {"rank": 6}
    assert version.recipe["kind"] == "sum" and version.recipe["strategy"] == "svd"
    # What storing the sum at rank 6 lost, as merge measured it, travels with the version.
    assert version.recipe["truncation_error"] == merged.result.truncation_error > 0
    assert version.digest == adapter_digest(merged.adapter)
    again = WeightedSum.from_dict(merged.to_dict(), hub=hub)
    assert adapter_digest(again.adapter) == version.digest


def test_exact_sum_runs_like_the_inputs_attached_as_a_weighted_stack(hub, model):
    weights = [0.7, -0.3, 1.5]
    handle = activate(model, compose(["a", "b", "c"], weights, hub=hub))
    merged = logits(model)
    handle.detach()
    stack = attach(model, [hub.load(n) for n in ("a", "b", "c")], weight=weights)
    stacked = logits(model)
    stack.detach()
    assert (merged - stacked).abs().max() <= 1e-5
    assert (merged - logits(model)).abs().max() > 1e-3  # and the adapters do change the model


def test_sum_of_ia3_vectors_and_of_prompts_through_compose(adapters):
    assert compose([adapters["ia3"], adapters["ia3"]], [0.5, 0.5]).adapter.method == "ia3"
    assert compose([adapters["prompt"]], [2.0]).adapter.method == "prompt_tuning"


# ---------------------------------------------------------------------------------------------------------------
# Stacks


def test_stack_of_different_methods_registers_and_reactivates_from_its_ref(hub, model, adapters):
    stack = compose(["a", "ia3", "prompt", "c"], [0.5, 1.0, 1.0, 2.0], kind="stack", hub=hub)
    assert isinstance(stack, Stack)
    handle = stack.attach(model)
    expected = logits(model)
    handle.detach()
    version = stack.register(hub, name="combo").version
    assert version.method == "stack" and version.base == model.hub_fingerprint
    assert [(p.ref, p.weight, p.strategy) for p in version.parents] == [
        ("a@1", 0.5, "stack"), ("ia3@1", 1.0, "stack"), ("prompt@1", 1.0, "stack"), ("c@1", 2.0, "stack")]
    artifact = hub.load("combo")
    assert artifact.tensors == {} and [m["name"] for m in artifact.config["members"]] == ["a", "ia3", "prompt", "c"]
    handle = activate(model, "combo@1", hub=hub)
    try:
        assert torch.equal(logits(model), expected)
        assert handle.name == "combo@1" and [h.name for h in handle.handles] == ["a@1", "ia3@1", "prompt@1", "c@1"]
    finally:
        handle.detach()
    assert not gate_context(model).on


def test_stack_of_adapters_in_memory_stores_them_so_the_stack_reloads(hub_home, model, adapters, tmp_path):
    stack = compose([adapters["a"], adapters["d"]], [1.0, -1.0], kind="stack")
    stack.register(name="mem", base=model.hub_fingerprint)
    handle = activate(model, "mem", hub=Hub())
    got = logits(model)
    handle.detach()
    handle = attach(model, [adapters["a"], adapters["d"]], weight=[1.0, -1.0])
    assert torch.equal(got, logits(model))
    handle.detach()
    # The artifact is a plain folder like any adapter: a stack read from disk names its members by digest.
    folder = write_adapter(stack.to_adapter(), tmp_path / "stack")
    assert [m.digest for m in Stack.from_adapter(read_adapter(folder), hub=Hub()).members] == \
        [adapter_digest(adapters["a"]), adapter_digest(adapters["d"])]


# ---------------------------------------------------------------------------------------------------------------
# Mixtures


@pytest.mark.parametrize("router", [RouterConfig(), RouterConfig(kind="two_pass", depth=2, width=16, top_k=2)],
                         ids=["layerwise", "two_pass"])
def test_mixture_saves_and_reloads_every_gate_tensor(hub, model, router):
    mixture = compose(["a", "b", "c", "d"], kind="mixture", router=router, hub=hub)
    handle = mixture.attach(model)
    randomize_gate(mixture)
    expected = logits(model)
    handle.detach()
    saved = {key: tensor.clone() for key, tensor in mixture.to_adapter().tensors.items()}
    depth = 2 if router.kind == "two_pass" else 0
    assert len(saved) == (4 if depth else 2)
    version = mixture.register(hub, name="router").version
    assert version.method == "mixture" and [p.ref for p in version.parents] == ["a@1", "b@1", "c@1", "d@1"]
    reloaded = hub.load("router@1")
    assert set(reloaded.tensors) == set(saved) and all(torch.equal(reloaded.tensors[k], saved[k]) for k in saved)
    handle = activate(model, "router", hub=hub)
    try:
        assert handle.method == "mixture"
        assert torch.equal(logits(model), expected)
    finally:
        handle.detach()


@pytest.mark.parametrize("kind", ["layerwise", "two_pass"])
def test_generation_with_the_router_uses_the_kv_cache_and_matches_a_run_without(model, adapters, kind):
    mixture = compose([adapters[n] for n in "abcd"], kind="mixture", router=RouterConfig(kind=kind, top_k=2))
    handle = mixture.attach(model)
    randomize_gate(mixture, scale=3.0)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(7))
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    try:
        cached = model.generate(prompt, use_cache=True, **options)
        last = next(iter(handle.last_gates.values()))
        assert last.shape == (2, 1, 4)  # the last step fed one new token: the cache was used
        uncached = model.generate(prompt, use_cache=False, **options)
        assert next(iter(handle.last_gates.values())).shape == (2, 12, 4)
        assert torch.equal(cached, uncached)
        # The gates really route: tokens differ in which experts they use.
        full = handle.last_gates["model.layers.1"]
        assert (full.argmax(-1) != full[0, 0].argmax()).any()
        # Beam search reorders the cache (the two-pass router's own cache with it).
        beams = dict(options, num_beams=3)
        assert torch.equal(model.generate(prompt, use_cache=True, **beams),
                           model.generate(prompt, use_cache=False, **beams))
    finally:
        handle.detach()


def test_top_k_skips_the_experts_no_token_selected(model, adapters):
    mixture = compose([adapters[n] for n in "abcd"], kind="mixture", router=RouterConfig(top_k=2))
    handle = mixture.attach(model)
    try:
        with torch.no_grad():
            mixture.module.bias.copy_(torch.tensor([4.0, 3.0, 0.0, 0.0]))  # every token picks experts 0 and 1
            clean = logits(model)
            # Poison experts 2 and 3: if they ran at all, even times a zero gate, NaN would reach the logits.
            for site in model.modules():
                for name in handle.names[2:]:
                    if name in getattr(site, "weights", {}):
                        for param in site.delta(name).parameters():
                            param.fill_(float("nan"))
        assert torch.equal(logits(model), clean)
        gates = handle.last_gates["model.layers.0"]
        assert torch.all(gates[..., 2:] == 0) and torch.allclose(gates.sum(-1), torch.ones(2, 7))
        with torch.no_grad():
            mixture.module.bias.copy_(torch.tensor([0.0, 0.0, 4.0, 3.0]))
        assert torch.isnan(logits(model)).all()
    finally:
        handle.detach()


class CharTokenizer:
    """Enough of a tokenizer for hub.data.encode on the tiny model: one id per character, EOS 1, padding 0."""

    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [2 + ord(c) % 126 for c in text]}


@pytest.fixture(scope="module")
def nf4_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return load_base(folder, quantize="nf4").model


@pytest.mark.parametrize("kind", ["layerwise", "two_pass"])
def test_fit_trains_only_the_gate_through_a_frozen_nf4_base(nf4_model, adapters, kind):
    model = nf4_model
    mixture = compose([adapters[n] for n in "abd"], kind="mixture", router=RouterConfig(kind=kind))
    handle = mixture.attach(model)
    try:
        for param in handle.parameters():
            param.requires_grad_(True)
        model(TOKENS, labels=TOKENS).loss.backward()
        grads = [p.grad for p in mixture.module.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        if kind == "layerwise":  # every layer's gate gets its gradient
            assert all(mixture.module.weight.grad[layer].abs().sum() > 0 for layer in range(2))
        experts = [p for h in handle.experts.handles for p in h.parameters()]
        assert experts and all(p.grad is None and not p.requires_grad for p in experts)
        mixture.module.zero_grad(set_to_none=True)
        for param in handle.parameters():
            param.requires_grad_(False)
    finally:
        handle.detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gate_before = mixture.to_adapter().tensors
    examples = [Example(prompt=f"q{i} ", completion=f"answer {i % 3}") for i in range(12)]
    result = mixture.fit(model, CharTokenizer(), examples, steps=12, lr=0.05, batch_size=4, progress=False)
    assert len(result.losses) == 12 and min(result.losses[-4:]) < result.losses[0]
    assert mixture.fitted["steps"] == 12
    after = mixture.to_adapter().tensors
    assert any(not torch.equal(after[k], gate_before[k]) for k in after)
    assert not any(p.requires_grad for p in mixture.module.parameters())
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert "hub_mixture" not in model.__dict__  # fit attached the mixture for its duration only


def test_a_top_1_gate_trains_dense_and_runs_sparse(model, adapters):
    mixture = compose([adapters[n] for n in "abd"], kind="mixture", router=RouterConfig(top_k=1))
    examples = [Example(prompt=f"q{i} ", completion=f"answer {i % 3}") for i in range(8)]
    mixture.fit(model, CharTokenizer(), examples, steps=3, lr=0.05, batch_size=4, progress=False)
    assert mixture.module.weight.abs().sum() > 0  # a top-1 gate renormalised to 1 would have had no gradient
    handle = mixture.attach(model)
    try:
        logits(model)
        assert all(((gates > 0).sum(-1) == 1).all() for gates in handle.last_gates.values())
    finally:
        handle.detach()


def test_two_pass_refuses_a_cache_it_did_not_see_start(model, adapters):
    with torch.no_grad():
        cache = model(TOKENS, use_cache=True).past_key_values
    mixture = compose([adapters["a"], adapters["b"]], kind="mixture", router=RouterConfig(kind="two_pass"))
    handle = mixture.attach(model)
    try:
        with pytest.raises(Incompatible, match="out of step"):
            model(TOKENS[:, :1], past_key_values=cache, use_cache=True)
    finally:
        handle.detach()


def test_one_mixture_per_model_and_detach_restores_the_model(model, adapters):
    before = logits(model)
    first = compose([adapters["a"], adapters["b"]], kind="mixture").attach(model)
    with pytest.raises(Conflict, match="already attached"):
        compose([adapters["c"], adapters["d"]], kind="mixture").attach(model)
    first.detach()
    assert torch.equal(logits(model), before)
    assert not gate_context(model).on


def test_a_mixture_pushed_with_its_experts_pulls_and_runs_in_another_hub(hub, model, tmp_path):
    mixture = compose(["a", "b"], kind="mixture", router=RouterConfig(kind="two_pass", depth=2, width=8), hub=hub)
    handle = mixture.attach(model)
    randomize_gate(mixture)
    expected = logits(model)
    handle.detach()
    mixture.register(hub, name="mix")
    token = "hf_test_token"
    with HubServer(tokens={token: "alice"}) as server:
        for ref in ("a@1", "b@1", "mix@1"):
            Remote(hub, endpoint=server.url, token=token).push(ref, f"alice/{ref.split('@')[0]}")
        target = Hub(home=tmp_path / "elsewhere")
        for repo in ("alice/a", "alice/b", "alice/mix"):
            Remote(target, endpoint=server.url, token=token).pull(repo)
    version = target.get("mix@1")
    assert version.method == "mixture" and [p.ref for p in version.parents] == ["a@1", "b@1"]
    handle = activate(model, "mix", hub=target)
    try:
        assert torch.equal(logits(model), expected)
    finally:
        handle.detach()


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one-line errors of hub.errors types


def other_base_adapter(tmp_path) -> Adapter:
    other = tiny_llama()
    with torch.no_grad():
        other.lm_head.weight.mul_(2)
    return peft_adapter(other, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), tmp_path)[1]


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda: compose([]), Incompatible, "list of adapters is empty"),
    (lambda: compose("a"), Incompatible, "takes a list"),
    (lambda: compose(["a", "b"], [1.0]), Incompatible, "got 1 weights for 2 adapters"),
    (lambda: compose(["a", "b"], [0, 0.0]), Incompatible, "all weights are zero"),
    (lambda: compose(["a", "b"], [1.0, float("nan")]), Incompatible, "not a finite number"),
    (lambda: compose(["a", "b"], strategy="svd", rank=99), Incompatible, "rank 99 is larger"),
    (lambda: compose(["a", "prompt"]), Incompatible, "stack these adapters instead"),
    (lambda: compose(["a", "b"], strategy="median"), Incompatible, "unknown merge strategy"),
    (lambda: compose(["a", "b"], kind="blend"), Incompatible, "unknown composition kind"),
    (lambda: compose(["a", "b"], kind="stack", strategy="svd"), Incompatible, "apply to weighted sums"),
    (lambda: compose(["a", "b"], router=RouterConfig()), Incompatible, "router applies to kind='mixture'"),
    (lambda: compose(["a", "a@1"], kind="stack"), Incompatible, "a@1 appears twice"),
    (lambda: compose(["a", "prompt"], kind="mixture"), Incompatible, "prompt_tuning adapter; mixture experts"),
    (lambda: compose(["a", "b"], kind="mixture", router=RouterConfig(top_k=3)), Incompatible, "top_k must be"),
    (lambda: compose(["a", "nobody"]), NotFound, "nobody"),
])
def test_bad_inputs_are_refused_with_one_line(hub, call, error, message):
    with pytest.raises(error, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_adapters_for_different_bases_are_refused(hub, tmp_path):
    hub.register(other_base_adapter(tmp_path), name="other", base=fingerprint(tiny_llama().half()))
    for kind in ("sum", "stack", "mixture"):
        with pytest.raises(Incompatible, match="compose adapters of one base") as caught:
            compose(["a", "other"], kind=kind, hub=hub)
        assert "\n" not in str(caught.value)


def test_compositions_do_not_nest_and_refs_check_their_base(hub, model, tmp_path):
    compose(["a", "b"], kind="stack", hub=hub).register(hub, name="ab")
    with pytest.raises(Incompatible, match="compositions do not nest"):
        compose(["ab", "c"], kind="stack", hub=hub)
    hub.register(other_base_adapter(tmp_path), name="elsewhere", base=fingerprint(tiny_llama().half()))
    with pytest.raises(Incompatible, match="different weights|different shapes"):
        activate(model, "elsewhere", hub=hub)


def test_malformed_composition_artifacts_are_refused(hub, model, tmp_path):
    mixture = compose(["a", "b"], kind="mixture", hub=hub)
    with pytest.raises(Incompatible, match="no shape yet"):
        mixture.to_adapter()
    mixture.bind(model)
    artifact = mixture.to_adapter()
    broken = Adapter(config=artifact.config, tensors={"router.weight": artifact.tensors["router.weight"]})
    with pytest.raises(InvalidArtifact, match="missing router.bias"):
        read_adapter(write_adapter(broken, tmp_path / "broken"))
    stack = Stack([m for m in mixture.experts]).to_adapter()
    with pytest.raises(InvalidArtifact, match="a stack holds no tensors"):
        read_adapter(write_adapter(Adapter(config=stack.config, tensors=dict(artifact.tensors)), tmp_path / "s"))


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_compose_registers_with_lineage(hub):
    runner = CliRunner()
    result = runner.invoke(compose_command, ["a@1", "b", "--weights", "0.7,0.3", "--strategy", "svd", "--rank", "4",
                                             "--name", "merged"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("registered merged@1 (lora of a@1 ×0.7, b@1 ×0.3")
    result = runner.invoke(compose_command, ["a", "ia3", "--kind", "stack", "--name", "st", "--json"])
    assert result.exit_code == 0, result.output
    assert '"method": "stack"' in result.output
    result = runner.invoke(compose_command, ["a", "b", "--kind", "mixture", "--name", "m"])
    assert result.exit_code == 2 and "must be trained" in result.output
    result = runner.invoke(compose_command, ["a", "b", "--weights", "1,x", "--name", "m"])
    assert result.exit_code == 2 and "not a comma-separated list" in result.output
