"""Every adapter type PEFT 0.21.2 can instantiate on a tiny Llama comes in: PEFT creates and saves it, the hub
registers, pushes, pulls and exports it, and PEFT loads the export with identical tensors. Types the hub runs give
PEFT's logits; the others say in one line that they are stored only."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from hubserver import HubServer
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from hub.client import Hub
from hub.errors import Incompatible, InvalidArtifact
from hub.methods import lookup, peft_types
from hub.remote import Remote

TOKEN = "hf_types"
IDS = torch.tensor([[1, 5, 9, 33, 70, 101, 3]])
# What a type needs beyond target_modules=["q_proj", "v_proj"] (or num_virtual_tokens=4) to fit 32-wide layers.
OPTIONS: dict[str, dict] = {
    "ADALORA": {"total_step": 10, "init_r": 4, "target_r": 2},
    "ADAPTION_PROMPT": {"adapter_len": 4, "adapter_layers": 1, "target_modules": "self_attn"},
    "C3A": {"block_size": 8},
    "FOURIERFT": {"n_frequency": 16},
    "IA3": {"feedforward_modules": []},
    "MISS": {"r": 8},
    "PSOFT": {"r": 8},
    "ROAD": {"group_size": 8},
    "SHIRA": {"r": 4},
    "VBLORA": {"vector_length": 8, "num_vectors": 16},
    "WAVEFT": {"n_frequency": 16},
}
# X-LoRA needs expert adapters saved beforehand and use_cache=False, and its 0.21.2 save drops its classifier
# (reference/peft-anchor.md): test_xlora_folder_round_trips_byte_faithfully makes one by hand.
NOT_INSTANTIABLE = {"XLORA"}


def test_the_table_knows_every_peft_type() -> None:
    assert {t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING} <= set(peft_types())
    # The hub's own formats (docs/formats.md): PEFT has no such types, so there is no PEFT oracle for them here.
    assert set(peft_types()) - {t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING} == {"BITFIT", "BOTTLENECK", "DENSELORA"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("types")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "base")
    with HubServer(tokens={TOKEN: "alice"}) as server:
        yield root, server


def _peft_saved(peft_type: str, base: Path, folder: Path) -> Path:
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    fields = config_class.__dataclass_fields__
    options = {"task_type": "CAUSAL_LM"}
    if "target_modules" in fields:
        options["target_modules"] = ["q_proj", "v_proj"]
    if "num_virtual_tokens" in fields:
        options["num_virtual_tokens"] = 4
    options.update(OPTIONS.get(peft_type, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base), config_class(**options))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:  # off their (often identity) initial values
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(folder)
    return folder


def _peft_loaded(base: Path, folder: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), folder).eval()


@pytest.mark.parametrize("peft_type", sorted({t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING} - NOT_INSTANTIABLE))
def test_every_peft_type_registers_pushes_pulls_and_exports_byte_faithfully(world, peft_type: str) -> None:
    root, server = world
    base = root / "base"
    folder = _peft_saved(peft_type, base, root / peft_type / "peft")
    name = peft_type.lower().replace("_", "-")
    source = Hub(home=root / peft_type / "source")
    registered = source.register(folder, name=name, base=base).version
    assert registered.method == lookup(peft_type).label(registered.config)
    assert [v.ref for v in source.list()] == [f"{name}@1"]

    Remote(source, endpoint=server.url, token=TOKEN).push(f"{name}@1", f"alice/{name}")
    target = Hub(home=root / peft_type / "target")
    pulled = Remote(target, endpoint=server.url, token=TOKEN).pull(f"alice/{name}", "v1")
    assert pulled.version.digest == registered.digest
    exported = target.export(f"{name}@1", root / peft_type / "exported")

    original, copy = (load_file(f / "adapter_model.safetensors") for f in (folder, exported))
    assert original.keys() == copy.keys() and all(torch.equal(original[k], copy[k]) for k in original)
    theirs, ours = _peft_loaded(base, folder), _peft_loaded(base, exported)
    mine = ours.state_dict()
    assert all(torch.equal(tensor, mine[key]) for key, tensor in theirs.state_dict().items())

    model = LlamaForCausalLM.from_pretrained(base).eval()
    method = lookup(peft_type)
    if not method.attachable:
        with pytest.raises(Incompatible) as refused:
            target.activate(model, f"{name}@1")
        assert str(refused.value) == f"{method.name} adapters are stored and shared here but cannot be attached yet"
        return
    target.activate(model, f"{name}@1")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=0, atol=1e-4)


def _xlora_folder(base: Path, folder: Path, *, with_experts: bool) -> Path:
    """An X-LoRA folder as PEFT lays it out: the config names its experts, the classifier at the top level, and
    (unless PEFT 0.21.2's save dropped them) each expert LoRA in a subfolder."""
    from peft import LoraConfig
    from peft_saved import save_peft
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    names = ["expert_0", "expert_1"]
    if with_experts:
        for seed, name in enumerate(names):
            save_peft(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), folder / name,
                      seed=seed)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "XLORA", "task_type": "CAUSAL_LM", "hidden_size": 32, "xlora_depth": 1,
        "adapters": {name: name for name in names}}))
    generator = torch.Generator().manual_seed(0)
    save_file({"internal_xlora_classifier.layers.0.weight": torch.randn(2, 32, generator=generator),
               "internal_xlora_classifier.layers.0.bias": torch.randn(2, generator=generator)},
              folder / "adapter_model.safetensors")
    return folder


def test_xlora_folder_round_trips_byte_faithfully_and_one_with_expert_subfolders_is_refused(world) -> None:
    root, server = world
    base = root / "base"
    hub = Hub(home=root / "xlora" / "home")
    nested = _xlora_folder(base, root / "xlora" / "nested", with_experts=True)
    with pytest.raises(InvalidArtifact, match=r"keeps the adapters it names in subfolders \(expert_0, expert_1\)"):
        hub.register(nested, name="xl", base=base)
    assert hub.list() == [] and not any(hub.store.root.rglob("*.safetensors"))

    folder = _xlora_folder(base, root / "xlora" / "top", with_experts=False)
    assert hub.register(folder, name="xl", base=base).version.method == "xlora"
    Remote(hub, endpoint=server.url, token=TOKEN).push("xl@1", "alice/xl")
    target = Hub(home=root / "xlora" / "target")
    Remote(target, endpoint=server.url, token=TOKEN).pull("alice/xl", "v1")
    exported = target.export("xl@1", root / "xlora" / "exported")
    original, copy = (load_file(f / "adapter_model.safetensors") for f in (folder, exported))
    assert original.keys() == copy.keys() and all(torch.equal(original[k], copy[k]) for k in original)
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["adapters"] == {"expert_0": "expert_0", "expert_1": "expert_1"} and config["peft_type"] == "XLORA"
