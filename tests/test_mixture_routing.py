"""Sequence routing of a mixture's gate (``RouterConfig(routing="sequence")``), on a tiny random Llama.

Why it exists (a gate fitted from little data) is measured by ``bench/bench_mixture.py --fit``; the SmolLM2
acceptance test is tests/test_mixture_smollm2.py. Here: what the router computes, in a forward and in decoding,
and how it is saved.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from runtime_peft import peft_adapter, tiny_llama

from hub import compose
from hub.client import Hub
from hub.composition import Mixture, RouterConfig
from hub.errors import Incompatible, InvalidArtifact
from hub.fingerprint import fingerprint
from hub.formats import Adapter
from hub.formats.peft import validate

TOKENS = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    model = tiny_llama()
    model.hub_fingerprint = fingerprint(model)
    return model


@pytest.fixture(scope="module")
def experts(model, tmp_path_factory) -> list[Adapter]:
    root = tmp_path_factory.mktemp("fit-experts")
    targets = ["q_proj", "v_proj", "down_proj"]
    return [peft_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
                         root / str(i), seed=i + 1)[1] for i in range(3)]


def randomized(experts: list[Adapter], router: RouterConfig, model) -> Mixture:
    mixture = compose(experts, kind="mixture", router=router)
    mixture.bind(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in mixture.module.parameters():
            param.copy_(3 * torch.randn(param.shape, generator=generator))
    return mixture


def gates_of(model, mixture: Mixture, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The gates [layers, B, S, experts] the mixture gives ``ids``."""
    handle = mixture.attach(model)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        return torch.stack(list(handle.last_gates.values()))
    finally:
        handle.detach()


def test_sequence_routing_gives_every_token_its_prompts_pooled_gate(model, experts):
    sequence = randomized(experts, RouterConfig(routing="sequence"), model)
    per_token = Mixture(sequence.experts, RouterConfig(), layers=sequence.layers, hidden_size=sequence.hidden_size,
                        module=sequence.module)
    # Row 1 is left-padded by two tokens: padding must not count in its gate.
    ids = TOKENS.clone()
    ids[1, :2] = 0
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    gates = gates_of(model, sequence, ids, mask)
    assert torch.allclose(gates, gates[:, :, :1].expand_as(gates))  # one gate per sequence and layer
    assert not torch.allclose(gates[:, 0, 0], gates[:, 1, 0])  # but its own per sequence
    alone = gates_of(model, sequence, ids[1:, 2:])
    assert torch.allclose(gates[:, 1, -1], alone[:, 0, 0], atol=1e-5)
    # The pooled gate is the gate of the mean per-token logits (for the linear layerwise gate: of the mean input).
    token_gates = gates_of(model, per_token, ids[1:, 2:])
    assert not torch.allclose(token_gates, alone)
    handle = sequence.attach(model)
    try:
        logits = [handle.mixture.module(h, i) for i, h in enumerate(_layer_inputs(model, ids[1:, 2:]))]
        expected = torch.softmax(torch.stack([lg.mean(1) for lg in logits]), -1)
        assert torch.allclose(alone[:, 0, 0], expected[:, 0], atol=1e-5)
    finally:
        handle.detach()


def _layer_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states entering each decoder layer of ``model`` for ``ids`` (whatever is attached)."""
    inputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


@pytest.mark.parametrize("kind", ["layerwise", "two_pass"])
def test_sequence_routing_decodes_with_the_prompts_gate(model, experts, kind):
    mixture = randomized(experts, RouterConfig(kind=kind, routing="sequence"), model)
    prompt = TOKENS[:1]
    handle = mixture.attach(model)
    try:
        with torch.no_grad():
            model(input_ids=prompt)
            prompt_gates = {path: gates[:, -1] for path, gates in handle.last_gates.items()}
            out = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, use_cache=True,
                                 pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + 4
        for path, gates in handle.last_gates.items():  # the last decoding step: one new token
            assert gates.shape[1] == 1 and torch.allclose(gates[:, 0], prompt_gates[path], atol=1e-5)
    finally:
        handle.detach()


def test_the_routing_is_recorded_and_old_artifacts_route_per_token(hub_home, model, experts):
    hub = Hub()
    names = []
    for index, expert in enumerate(experts):
        names.append(hub.register(expert, name=f"expert{index}", base=model.hub_fingerprint).version.ref)
    mixture = compose(names, kind="mixture", router=RouterConfig(routing="sequence"), hub=hub)
    mixture.bind(model)
    version = mixture.register(hub, name="router").version
    artifact = hub.load(version.ref)
    assert artifact.config["router"]["routing"] == "sequence"
    assert Mixture.from_adapter(artifact, hub=hub).router.routing == "sequence"
    # A mixture saved before routing existed has no such key: it loads, and routes per token as it did.
    router = {k: v for k, v in artifact.config["router"].items() if k != "routing"}
    old = Mixture.from_adapter(Adapter(config={**artifact.config, "router": router}, tensors=artifact.tensors),
                               hub=hub)
    assert old.router.routing == "token"
    assert all(torch.equal(old.to_adapter().tensors[k], t) for k, t in artifact.tensors.items())
    with pytest.raises(Incompatible, match="routing must be one of token, sequence, not 'prompt'"):
        compose(experts, kind="mixture", router=RouterConfig(routing="prompt"))
    # A file that says so is refused when read, before anything is registered.
    bad = {**artifact.config, "router": {**artifact.config["router"], "routing": "prompt"}}
    with pytest.raises(InvalidArtifact, match="router routing must be one of token, sequence, not 'prompt'"):
        validate(Adapter(config=bad, tensors=artifact.tensors))
