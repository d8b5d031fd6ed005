"""``hub diff``: two versions compared, their weight updates in ΔW space without forming ΔW.

The oracle is PEFT's own dense ΔW per module (``get_delta_weight`` of each adapted layer), on adapters PEFT made
with random weights on a tiny Llama; the hub's factored figures must equal the dense ones to float tolerance.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig
from runtime_peft import peft_adapter, tiny_llama

from cli.main import cli
from hub import compose
from hub.client import Hub
from hub.errors import NotFound, QueryError
from hub.registry import Metric

PREFIX = "base_model.model."
CONFIGS = {
    "lora4": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "lora8": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"],
                        init_lora_weights=False),
    "bias": LoraConfig(r=2, lora_alpha=4, lora_bias=True, target_modules=["q_proj"], init_lora_weights=False),
    "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
    "lokr": LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init_weights=False),
    "lokr2": LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"], init_weights=False),
    "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{name: (dense ΔW per module path from PEFT, hub Adapter)}."""
    model = tiny_llama()
    root = tmp_path_factory.mktemp("diff-adapters")
    result = {}
    for seed, (name, config) in enumerate(CONFIGS.items(), start=1):
        peft_model, adapter = peft_adapter(model, config, root / name, seed=seed)
        dense = {}
        for path, module in peft_model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and name != "ia3":
                delta = module.get_delta_weight("default").detach().double()
                lora_b = module.lora_B["default"] if hasattr(module, "lora_B") else None
                bias = getattr(lora_b, "bias", None)
                if bias is not None:  # lora_bias: one more column of the update, scaled as PEFT applies it
                    delta = torch.cat([delta, (bias.detach().double() * module.scaling["default"])[:, None]], dim=1)
                dense[path.removeprefix(PREFIX)] = delta
        result[name] = (dense, adapter)
    return result


@pytest.fixture
def hub(hub_home, made) -> Hub:
    hub = Hub()
    model = tiny_llama()
    from hub.fingerprint import fingerprint

    base = fingerprint(model)
    for name, (_, adapter) in made.items():
        hub.register(adapter, name=name, base=base, metrics=[Metric("accuracy", 0.5 + len(name) / 100, "gsm8k")])
    return hub


def dense_figures(da: dict[str, torch.Tensor], db: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Per module (‖ΔA‖, ‖ΔB‖, ‖ΔA − ΔB‖, cosine or None), from the dense matrices."""
    figures = {}
    for path in da.keys() | db.keys():
        a = da.get(path, torch.zeros_like(db.get(path, torch.zeros(1))))
        b = db.get(path, torch.zeros_like(a))
        # A module without a LoRA bias has a zero bias column beside one with it.
        width = max(a.shape[1], b.shape[1])
        a, b = (torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in (a, b))
        na, nb = a.norm().item(), b.norm().item()
        cosine = (a * b).sum().item() / (na * nb) if na and nb else None
        figures[path] = (na, nb, (a - b).norm().item(), cosine)
    return figures


def assert_matches_dense(weights, da: dict[str, torch.Tensor], db: dict[str, torch.Tensor]) -> None:
    expected = dense_figures(da, db)
    assert {m.module for m in weights.modules} == set(expected)
    for module in weights.modules:
        na, nb, nd, cos = expected[module.module]
        scale = max(na, nb)
        assert module.norm_a == pytest.approx(na, rel=1e-6, abs=1e-9)
        assert module.norm_b == pytest.approx(nb, rel=1e-6, abs=1e-9)
        # ‖a − b‖ from the expansion loses digits to cancellation when a ≈ b: compare against the scale.
        assert module.norm_diff == pytest.approx(nd, abs=1e-6 * scale), module
        if cos is None:
            assert module.cosine is None
        else:
            assert module.cosine == pytest.approx(cos, abs=1e-6)
    total_a = math.sqrt(sum(f[0] ** 2 for f in expected.values()))
    total_b = math.sqrt(sum(f[1] ** 2 for f in expected.values()))
    assert weights.norm_a == pytest.approx(total_a, rel=1e-6)
    assert weights.norm_b == pytest.approx(total_b, rel=1e-6)
    assert weights.norm_diff == pytest.approx(math.sqrt(sum(f[2] ** 2 for f in expected.values())),
                                              abs=1e-6 * max(total_a, total_b))
    # The ordering promise: the modules that differ most come first.
    assert [m.norm_diff for m in weights.modules] == sorted((m.norm_diff for m in weights.modules), reverse=True)


@pytest.mark.parametrize(("a", "b", "via"), [
    ("lora4", "lora8", {"gram"}),  # different ranks (rsLoRA scaling too) and target sets (k_proj in b only)
    ("lora4", "loha", {"gram"}),  # LoHa through its Khatri–Rao factor pair
    ("lora4", "bias", {"gram"}),  # a LoRA bias is one more column
    ("lokr", "lokr2", {"kronecker"}),  # same factor shapes: the Kronecker identity
    ("loha", "lokr", {"gram", "dense"}),  # whole LoKr factors on small modules: dense is cheaper there
])
def test_diff_equals_a_dense_computation(hub: Hub, made, a: str, b: str, via: set[str]) -> None:
    diff = hub.diff(a, b)
    assert diff.weights_refused is None
    assert_matches_dense(diff.weights, made[a][0], made[b][0])
    shared = {m.via for m in diff.weights.modules if "only" not in m.via}
    assert shared <= via and shared
    only = set(made[b][0]) - set(made[a][0])
    assert set(diff.weights.only_b) == only


def test_a_version_against_its_own_merged_sum(hub: Hub, made) -> None:
    merged = compose(["lora4", "lora8"], [0.7, 0.3], hub=hub).register(name="merged")
    diff = hub.diff("lora4", merged.version.ref)
    (d4, _), (d8, _) = made["lora4"], made["lora8"]
    expected = {path: 0.7 * d4.get(path, 0) + 0.3 * d8.get(path, 0) for path in d4.keys() | d8.keys()}
    assert_matches_dense(diff.weights, d4, expected)
    assert diff.a.ref == "lora4@1" and any(c.key == "rank" for c in diff.fields)


def test_a_version_against_itself_is_identical(hub: Hub) -> None:
    diff = hub.diff("loha", "loha@1")
    assert diff.same_artifact and diff.fields == [] and diff.config == [] and diff.metrics[0].delta == 0
    assert diff.weights.norm_diff == pytest.approx(0, abs=1e-6 * diff.weights.norm_a)
    assert diff.weights.cosine == pytest.approx(1.0)


def test_metadata_differences(hub: Hub) -> None:
    hub.add_metrics("lora8", [Metric("bleu", 3.0)])
    diff = hub.diff("lora4", "lora8")
    changes = {c.key: (c.a, c.b) for c in diff.config}
    assert changes["r"] == (4, 8) and changes["use_rslora"] == (False, True)
    metrics = {(m.key, m.dataset): m for m in diff.metrics}
    assert metrics[("accuracy", "gsm8k")].delta == pytest.approx(0.0)
    assert metrics[("bleu", None)].a is None and metrics[("bleu", None)].delta is None
    data = diff.to_dict()
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize(("other", "reason"), [("ia3", "IA3 scales activations")])
def test_methods_without_an_additive_update_are_refused_with_a_reason(hub: Hub, other: str, reason: str) -> None:
    diff = hub.diff("lora4", other)
    assert diff.weights is None and reason in diff.weights_refused and "ia3@1" in diff.weights_refused
    assert diff.metrics  # the rest of the comparison is still there


def test_unknown_and_malformed_refs(hub: Hub) -> None:
    with pytest.raises(NotFound, match="no adapter named 'nope'"):
        hub.diff("lora4", "nope")
    with pytest.raises(QueryError):
        hub.diff("lora4@", "lora8")


def test_cli_diff(hub: Hub) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["diff", "lora4", "lora8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["a"] == "lora4@1" and data["weights"]["only_b"]
    text = runner.invoke(cli, ["diff", "lora4", "lora8"])
    assert text.exit_code == 0 and "‖ΔA−ΔB‖" in text.output and "k_proj" in text.output
    refused = runner.invoke(cli, ["diff", "lora4", "ia3"])
    assert refused.exit_code == 0 and "weights not compared: ia3@1: IA3" in refused.output
    missing = runner.invoke(cli, ["diff", "lora4", "nope"])
    assert missing.exit_code == 1 and missing.output.startswith("error: no adapter named 'nope'")
