"""Routing through the gate context: mixed batches, per-token mixtures, top-k skipping, layer-wise gates."""

from __future__ import annotations

import pytest
import torch
from peft import LoHaConfig, LoraConfig
from runtime_peft import LLAMA_CASES, peft_adapter, tiny_llama

from hub.errors import Incompatible
from hub.runtime import attach, gate_context

NAMES = ("a", "b", "c", "h", "d")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with five adapters of different ranks and kinds, and each one's output alone."""
    root = tmp_path_factory.mktemp("gates")
    model = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    configs = {
        "a": LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        "b": LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=targets, init_lora_weights=False),
        "c": LoraConfig(r=2, lora_alpha=2, lora_bias=True, target_modules=["q_proj"], init_lora_weights=False),
        "h": LoHaConfig(r=4, alpha=4, target_modules=targets, init_weights=False),
        "d": LLAMA_CASES["dora"](),
    }
    adapters = {n: peft_adapter(model, c, root / n, seed=i)[1] for i, (n, c) in enumerate(configs.items())}
    tokens = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(4))
    alone = {}
    with torch.no_grad():
        alone[None] = model(tokens).logits
        for name, adapter in adapters.items():
            handle = attach(model, adapter, name=name)
            alone[name] = model(tokens).logits
            handle.detach()
    return model, adapters, tokens, alone


@pytest.fixture
def stacked(setup):
    model, adapters, tokens, alone = setup
    handles = [attach(model, adapters[n], name=n) for n in NAMES]
    yield model, tokens, alone
    for handle in handles:
        handle.detach()
    gate_context(model).clear()


def run(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("assignment", [["a", "b", None, "c"], ["h", "a", "d", "h"], ["b", "b", "b", "b"]])
def test_mixed_batch_rows_each_get_their_own_adapter(stacked, assignment):
    model, tokens, alone = stacked
    with gate_context(model).rows(assignment):
        got = run(model, tokens)
    for row, name in enumerate(assignment):
        assert (got[row] - alone[name][row]).abs().max() <= 1e-5, (row, name)


def test_no_route_runs_the_whole_stack_and_all_ones_gates_equal_it(stacked):
    model, tokens, _ = stacked
    stack = run(model, tokens)
    ctx = gate_context(model)
    for weights in (torch.ones(5), torch.ones(4, 5), torch.ones(4, 5, 5)):
        with ctx.routed(NAMES, weights):
            assert (run(model, tokens) - stack).abs().max() <= 1e-5


def test_per_token_gates_pick_per_token(stacked):
    model, tokens, alone = stacked
    weights = torch.zeros(4, 5, 5)
    weights[:, :, NAMES.index("b")] = 1.0
    with gate_context(model).routed(NAMES, weights):
        assert (run(model, tokens) - alone["b"]).abs().max() <= 1e-5
    # Tokens routed to "a" up to position 2 and "b" after: a causal model's first positions match "a" alone.
    weights = torch.zeros(4, 5, 5)
    weights[:, :3, NAMES.index("a")] = 1.0
    weights[:, 3:, NAMES.index("b")] = 1.0
    with gate_context(model).routed(NAMES, weights):
        got = run(model, tokens)
    assert (got[:, :3] - alone["a"][:, :3]).abs().max() <= 1e-5
    assert (got[:, 3:] - alone["b"][:, 3:]).abs().max() > 1e-3


def test_experts_with_zero_gate_everywhere_are_skipped(stacked):
    model, tokens, _ = stacked
    # Poison expert "b" (this attachment's own copy of its tensors): if it ran at all, even times a zero gate,
    # NaN would reach the logits.
    for site in [m for m in model.modules() if "b" in getattr(m, "weights", {})]:
        for p in site.delta("b").parameters():
            p.data.fill_(float("nan"))
    weights = torch.zeros(4, 5, 5)
    weights[..., NAMES.index("a")] = 0.5
    weights[..., NAMES.index("h")] = 0.5
    with gate_context(model).routed(NAMES, weights):
        got = run(model, tokens)
    assert torch.isfinite(got).all()
    with gate_context(model).routed(["a", "h"], torch.full((4, 5, 2), 0.5), exclusive=True):
        assert torch.equal(run(model, tokens), got)


def test_weighted_rows_are_a_per_row_weighted_stack(stacked):
    model, tokens, _ = stacked
    ctx = gate_context(model)
    weights = torch.tensor([[0.3, 0.7, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.5, 0.0]] * 2)
    with ctx.routed(NAMES, weights):
        got = run(model, tokens)
    for row in range(4):
        with ctx.routed(NAMES, weights[row]):
            assert (got[row] - run(model, tokens)[row]).abs().max() <= 1e-5


def test_gates_carry_gradients_for_a_router(stacked):
    model, tokens, _ = stacked
    router = torch.zeros(4, 5, 5, requires_grad=True)
    with gate_context(model).routed(NAMES, torch.softmax(router, dim=-1)):
        model(tokens).logits.sum().backward()
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_per_site_gates_override_one_layer(stacked):
    model, tokens, alone = stacked
    ctx = gate_context(model)
    off = torch.zeros(5)
    only_a = torch.tensor([1.0, 0, 0, 0, 0])
    per_site = {f"model.layers.{i}.{m}": only_a for i in range(2)
                for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "self_attn.o_proj", "mlp.up_proj")}
    with ctx.routed(NAMES, off, per_site=per_site):
        assert (run(model, tokens) - alone["a"]).abs().max() <= 1e-5


def test_mixed_batch_survives_generation_with_beams(setup):
    model, adapters, _, _ = setup
    prompt = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(9))
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    single = {}
    for name in ("a", "d"):
        handle = attach(model, adapters[name], name=name)
        single[name] = model.generate(input_ids=prompt, **kwargs)
        handle.detach()
    handles = [attach(model, adapters[n], name=n) for n in ("a", "d")]
    try:
        with gate_context(model).rows(["a", "d"]):
            mixed = model.generate(input_ids=prompt, **kwargs)
    finally:
        for handle in handles:
            handle.detach()
    assert torch.equal(mixed[0], single["a"][0])
    assert torch.equal(mixed[1], single["d"][1])


def test_bad_gates_are_refused(stacked):
    model, tokens, _ = stacked
    ctx = gate_context(model)
    with pytest.raises(Incompatible, match="do not fit 5 adapters"):
        ctx.set(NAMES, torch.ones(4, 3))
    with pytest.raises(Incompatible, match="repeat an adapter"):
        ctx.set(["a", "a"], torch.ones(2))
    with ctx.routed(NAMES, torch.ones(3, 5)), pytest.raises(Incompatible, match="gates for 3 rows"):
        run(model, tokens)
    with ctx.routed(NAMES, torch.ones(4, 2, 5)), pytest.raises(Incompatible, match="per-token gates"):
        run(model, tokens)
