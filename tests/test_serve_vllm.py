"""Export to vLLM: any LoRA-family version, sum or stack as one plain LoRA whose delta equals the source's (PEFT
loads both), refusals with the reason, and the registry resolver plugin against vLLM's LoRAResolver interface."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model
from test_serve import register_adapters, tiny_base
from transformers import LlamaForCausalLM

from cli.main import cli
from hub.client import Hub
from hub.errors import Incompatible
from hub.export_vllm import VLLM_RANKS

TOKENS = torch.tensor([[3, 17, 42, 5, 99, 7, 64, 12], [8, 8, 21, 77, 3, 40, 2, 91]])
BASE_ID = "org/tiny-llama"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vllm")
    base = tiny_base(root / "base")
    hub = Hub(home=root / "home")
    register_adapters(hub, base, root, count=3)  # a0, a1 (rsLoRA), a2 (IA3); merged, stacked, mix of them
    from hub.composition import compose

    compose(["a0", "a1"], [0.5, 1.5], kind="stack", hub=hub).register(hub, name="lora-stack")
    for name, config in {
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"], init_lora_weights=False),
        "loha": LoHaConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False),
        "wide": LoraConfig(r=12, lora_alpha=6, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 3},
                           alpha_pattern={"layers.0.self_attn.q_proj": 20}, init_lora_weights=False),
    }.items():
        torch.manual_seed(5)
        get_peft_model(LlamaForCausalLM.from_pretrained(base), config).save_pretrained(root / name)
        hub.register(root / name, name=name, base=base, base_name=BASE_ID)
    return {"root": root, "base": base, "hub": hub}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def peft_logits(base: Path, folder: Path) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), folder).eval())


@pytest.mark.parametrize("ref", ["a0", "a1@1", "merged", "lora-stack", "loha", "wide"])
def test_the_vllm_export_is_the_source_delta_as_one_plain_lora(setup: dict[str, Any], ref: str,
                                                                tmp_path: Path) -> None:
    """LoRA, rsLoRA, a merged sum, a weighted stack, LoHa and per-module ranks/alphas: the export has one rank
    from vLLM's list, alpha = r, no patterns, and the model with it computes what the source computes."""
    from hub.composition import activate

    hub, base = setup["hub"], setup["base"]
    result = hub.export_for_vllm(ref, tmp_path / "out", base_model=BASE_ID)
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == result.rank == config["lora_alpha"]
    assert result.rank in VLLM_RANKS and result.rank >= result.source_rank and not result.reduced
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and not config["use_rslora"]
    assert not config["use_dora"] and not config["modules_to_save"]
    assert config["base_model_name_or_path"] == BASE_ID
    assert result.relative_error < 1e-6
    model = LlamaForCausalLM.from_pretrained(base).eval()
    handle = activate(model, ref, hub=hub)
    expected = logits(model)
    handle.detach()
    got = peft_logits(base, result.path)
    assert (got - expected).abs().max() < 1e-5 * max(1.0, float(expected.abs().max()))
    assert (expected - logits(model)).abs().max() > 1e-3  # the adapter does change the output


@pytest.mark.parametrize(("ref", "reason"), [
    ("dora", "DoRA"), ("mix", "gated mixture"), ("a2", "IA3 scales activations"), ("stacked", "IA3"),
])
def test_what_vllm_cannot_serve_is_refused_with_the_reason(setup: dict[str, Any], ref: str, reason: str,
                                                           tmp_path: Path) -> None:
    with pytest.raises(Incompatible, match=reason):
        setup["hub"].export_for_vllm(ref, tmp_path / "out", base_model=BASE_ID)
    assert not (tmp_path / "out").exists()


def test_hub_export_for_vllm_prints_rank_and_error(setup: dict[str, Any], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_HOME", str(setup["root"] / "home"))
    done = CliRunner().invoke(cli, ["export", "wide", str(tmp_path / "w"), "--for", "vllm"])
    assert done.exit_code == 0, done.output
    assert "rank 16" in done.output and "relative error" in done.output and "--max-lora-rank 16" in done.output
    done = CliRunner().invoke(cli, ["export", "a0", str(tmp_path / "x"), "--for", "vllm", "--json"])
    assert done.exit_code == 1 and "give the model id vLLM serves (--base-model)" in done.output  # no Hub id known
    done = CliRunner().invoke(cli, ["export", "a0", str(tmp_path / "x"), "--for", "vllm", "--base-model", BASE_ID,
                                    "--json"])
    assert json.loads(done.output)["rank"] == 8
    done = CliRunner().invoke(cli, ["export", "dora", str(tmp_path / "d"), "--for", "vllm"])
    assert done.exit_code == 1 and done.output.startswith("error: dora@1 cannot be served by vLLM: vLLM does not")


# ---------------------------------------------------------------------------------------------------------------
# The resolver plugin


@pytest.fixture
def vllm_interface(monkeypatch: pytest.MonkeyPatch) -> Any:
    """vLLM's resolver interface: the real one when vLLM imports, else a stand-in with vLLM 0.33's signatures
    (vllm/lora/resolver.py, vllm/lora/request.py: LoRAResolver.resolve_lora, LoRAResolverRegistry,
    LoRARequest(lora_name, lora_int_id, lora_path, base_model_name))."""
    try:
        from vllm.lora import resolver

        return resolver
    except ImportError:
        pass

    @dataclass
    class LoRARequest:
        lora_name: str
        lora_int_id: int
        lora_path: str = ""
        base_model_name: str | None = None

        def __post_init__(self) -> None:
            if self.lora_int_id < 1:
                raise ValueError(f"id must be > 0, got {self.lora_int_id}")
            assert self.lora_path, "lora_path cannot be empty"

    class LoRAResolver(ABC):
        @abstractmethod
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None: ...

    @dataclass
    class _Registry:
        resolvers: dict[str, LoRAResolver] = field(default_factory=dict)

        def register_resolver(self, name: str, resolver: LoRAResolver) -> None:
            self.resolvers[name] = resolver

        def get_resolver(self, name: str) -> LoRAResolver:
            return self.resolvers[name]

    modules = {name: types.ModuleType(name) for name in ("vllm", "vllm.lora", "vllm.lora.request",
                                                         "vllm.lora.resolver")}
    modules["vllm.lora.request"].LoRARequest = LoRARequest
    modules["vllm.lora.resolver"].LoRAResolver = LoRAResolver
    modules["vllm.lora.resolver"].LoRAResolverRegistry = _Registry()
    modules["vllm.lora.resolver"].LoRARequest = LoRARequest
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["vllm.lora.resolver"]


def test_the_resolver_plugin_serves_registry_references_to_vllm(setup: dict[str, Any], vllm_interface: Any,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.setenv("HUB_HOME", str(setup["root"] / "home"))
    monkeypatch.setenv("HUB_VLLM_CACHE", str(tmp_path / "cache"))
    plugin = {e.name: e for e in entry_points(group="vllm.general_plugins")}["adapter_hub"]
    plugin.load()()  # what vLLM's load_general_plugins does
    resolver = vllm_interface.LoRAResolverRegistry.get_resolver("adapter-hub")
    assert isinstance(resolver, vllm_interface.LoRAResolver)

    def resolve(name: str, base: str = BASE_ID) -> Any:
        return asyncio.run(resolver.resolve_lora(base, name))

    request = resolve("wide")
    assert request.lora_name == "wide" and request.lora_int_id >= 1
    config = json.loads((Path(request.lora_path) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_ID and config["r"] == 16
    assert resolve("wide@1").lora_path == request.lora_path  # the same content: exported once
    assert resolve("nope") is None and resolve("nope@@") is None
    assert resolve("dora") is None  # vLLM cannot serve DoRA (logged), so vLLM answers 404
    assert resolve("wide", base="org/other") is None  # another served model
    # A version registered by folder is served under that folder's name, or any name with HUB_VLLM_BASE.
    assert resolve("a0@prod", base=str(setup["base"])) is not None
    assert resolve("a0@prod", base="/models/tiny") is None
    monkeypatch.setenv("HUB_VLLM_BASE", str(setup["base"]))
    found = resolve("a0@prod", base="/models/tiny")
    assert found is not None and json.loads((Path(found.lora_path) / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "/models/tiny"
