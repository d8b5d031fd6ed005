"""hub.formats with PEFT 0.21.2 as the oracle: every method PEFT saves on a tiny Llama reads as the right spec and
writes back to a folder PEFT loads with bit-identical tensors; the canonical digest; bad folders are refused."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama_config
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peft.utils import get_peft_model_state_dict
from peft_saved import save_peft
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from hub.client import Hub, Query
from hub.errors import InvalidArtifact
from hub.formats import CONFIG_NAME, WEIGHTS_NAME, Adapter, adapter_digest, read_adapter, write_adapter
from hub.formats.spec import VOLATILE_CONFIG_KEYS

ATTN = ["q_proj", "v_proj"]
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def save_with_peft(config: Any, folder: Path, *, seed: int = 1) -> Path:
    """PEFT wraps a tiny Llama, every trainable parameter moves off its initial value, PEFT saves it."""
    return save_peft(tiny_base(), config, folder, seed)


def peft_load(folder: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(tiny_base(), folder).eval()


def loaded_tensors(model: PeftModel, method: str) -> dict[str, torch.Tensor]:
    """What PEFT holds after loading, keyed as in its files."""
    if method in PROMPT_METHODS:
        # In inference mode PEFT uses the loaded table as is (P-tuning's encoder output was baked in at save time).
        return {"prompt_embeddings": model.prompt_encoder["default"].embedding.weight}
    return get_peft_model_state_dict(model)


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key].detach().cpu(), tensor), key


# name → (PEFT config, the spec the hub must read: method, rank, alpha, targets, options)
CASES: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "lora": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=ATTN),
             dict(method="lora", rank=4, alpha=8.0, targets=("q_proj", "v_proj"), options={})),
    "rslora": (lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=ATTN),
               dict(method="lora", rank=4, alpha=8.0, targets=("q_proj", "v_proj"), options={"use_rslora": True})),
    "dora": (lambda: LoraConfig(r=4, lora_alpha=16, use_dora=True, target_modules=["q_proj", "down_proj"]),
             # DoRA is recorded under its own name (issue #9: `hub list --method dora` finds it).
             dict(method="dora", rank=4, alpha=16.0, targets=("down_proj", "q_proj"), options={"use_dora": True})),
    "lora_patterns": (
        lambda: LoraConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 6}, alpha_pattern={"v_proj": 3},
                           target_modules=ATTN, layers_to_transform=[1], layers_pattern="layers"),
        dict(method="lora", rank=6, alpha=8.0, targets=("q_proj", "v_proj"),
             options={"rank_pattern": {"q_proj": 6}, "alpha_pattern": {"v_proj": 3}, "layers_to_transform": [1]})),
    "lora_embedding": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
                       dict(method="lora", rank=4, alpha=8.0, targets=("embed_tokens", "q_proj"), options={})),
    "adalora": (lambda: AdaLoraConfig(init_r=6, target_r=3, total_step=10, lora_alpha=8, target_modules=ATTN),
                dict(method="adalora", rank=6, alpha=8.0, targets=("q_proj", "v_proj"), options={})),
    "loha": (lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]),
             dict(method="loha", rank=4, alpha=8.0, targets=("down_proj", "q_proj"), options={})),
    "lokr": (lambda: LoKrConfig(r=2, alpha=4, decompose_both=True, target_modules=["q_proj", "down_proj"]),
             dict(method="lokr", rank=2, alpha=4.0, targets=("down_proj", "q_proj"), options={})),
    "ia3": (lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            dict(method="ia3", rank=None, alpha=None, targets=("down_proj", "k_proj", "v_proj"),
                 options={"feedforward_modules": ["down_proj"]})),
    # OFT's r counts blocks and is 0 when oft_block_size is set (PEFT's default): no single rank to record.
    "oft": (lambda: OFTConfig(r=0, oft_block_size=8, target_modules=ATTN),
            dict(method="oft", rank=None, alpha=None, targets=("q_proj", "v_proj"), options={})),
    "boft": (lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=ATTN),
             dict(method="boft", rank=4, alpha=None, targets=("q_proj", "v_proj"), options={})),
    "prompt_tuning": (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                      dict(method="prompt_tuning", rank=None, alpha=None, targets=(),
                           options={"num_virtual_tokens": 4})),
    "prefix_tuning": (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                      dict(method="prefix_tuning", rank=None, alpha=None, targets=(),
                           options={"num_virtual_tokens": 3})),
    "p_tuning": (lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=24),
                 dict(method="p_tuning", rank=None, alpha=None, targets=(), options={"num_virtual_tokens": 5})),
    "ln_tuning": (lambda: LNTuningConfig(task_type="CAUSAL_LM"),
                  dict(method="ln_tuning", rank=None, alpha=None,
                       targets=("input_layernorm", "norm", "post_attention_layernorm"), options={})),
}


@pytest.fixture(scope="module")
def peft_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case saved once by PEFT."""
    root = tmp_path_factory.mktemp("peft-saved")
    return {name: save_with_peft(make(), root / name) for name, (make, _) in CASES.items()}


def copy_of(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


# ---------------------------------------------------------------------------------------------------------------
# Every PEFT method: read, describe, write back, load in PEFT


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_reads_right_and_round_trips_into_peft(case: str, peft_folders: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    folder = peft_folders[case]
    on_disk = load_file(folder / WEIGHTS_NAME)
    assert all(bool(t.ne(0).any()) for t in on_disk.values())  # nothing PEFT saved is a zero (identity) tensor

    adapter = read_adapter(folder)
    spec = adapter.spec
    expected = CASES[case][1]
    assert (spec.method, spec.rank, spec.alpha, spec.targets, spec.options) == (
        expected["method"], expected["rank"], expected["alpha"], expected["targets"], expected["options"])
    assert spec.base_model is None  # PEFT records none for a model built from a config
    assert_identical(adapter.tensors, on_disk)

    written = write_adapter(adapter, tmp_path / "hub-written")
    assert json.loads((written / CONFIG_NAME).read_text()) == json.loads((folder / CONFIG_NAME).read_text())
    assert adapter_digest(read_adapter(written)) == adapter_digest(adapter)
    assert_identical(loaded_tensors(peft_load(written), spec.method), on_disk)


def test_budget_allocated_adalora_reads_the_ranks_it_kept(tmp_path: Path) -> None:
    """After AdaLoRA's budget allocation PEFT saves every module cut to the rank its mask keeps; the spec's rank is
    the largest of those, and the cut tensors load back into PEFT."""
    config = AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6, lora_alpha=8,
                           target_modules=ATTN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_base(), config)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(0)
        for step in range(6):
            ids = torch.randint(0, 128, (2, 8))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
        model.save_pretrained(tmp_path / "peft")
    masks = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())["rank_pattern"]
    kept = {key.removesuffix(".lora_E"): sum(mask) for key, mask in masks.items()}
    assert len(kept) == 4 and max(kept.values()) < 6

    adapter = read_adapter(tmp_path / "peft")
    assert adapter.spec.rank == max(kept.values())
    assert {path: params["lora_A"].shape[0] for path, params in adapter.modules().items()} == kept
    written = write_adapter(adapter, tmp_path / "hub-written")
    assert_identical(get_peft_model_state_dict(peft_load(written)), load_file(tmp_path / "peft" / WEIGHTS_NAME))


# ---------------------------------------------------------------------------------------------------------------
# The hub's own formats (docs/formats.md)


def hub_format_adapters() -> dict[str, Adapter]:
    generator = torch.Generator().manual_seed(3)
    bitfit = Adapter(
        config={"peft_type": "BITFIT", "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "tiny"},
        tensors={f"base_model.model.model.layers.{layer}.self_attn.{name}.bias": torch.randn(size, generator=generator)
                 for layer in range(2) for name, size in (("q_proj", 32), ("v_proj", 16))})
    sites = ["model.layers.0.mlp", "model.layers.0.self_attn", "model.layers.1.mlp", "model.layers.1.self_attn"]
    tensors = {}
    for site in sites:
        for param, shape in (("adapter_down.weight", (6, 32)), ("adapter_down.bias", (6,)),
                             ("adapter_up.weight", (32, 6)), ("adapter_up.bias", (32,))):
            tensors[f"base_model.model.{site}.{param}"] = torch.randn(shape, generator=generator)
    bottleneck = Adapter(config={"peft_type": "BOTTLENECK", "placement": "houlsby", "bottleneck_size": 6,
                                 "non_linearity": "relu", "target_modules": sites, "layers_to_transform": [0, 1],
                                 "base_model_name_or_path": "tiny"}, tensors=tensors)
    return {"bitfit": bitfit, "bottleneck": bottleneck}


@pytest.mark.parametrize(("name", "expected"), [
    ("bitfit", dict(method="bitfit", rank=None, alpha=None, targets=("q_proj", "v_proj"), options={})),
    ("bottleneck", dict(method="bottleneck", rank=6, alpha=None, targets=("mlp", "self_attn"),
                        options={"placement": "houlsby", "layers_to_transform": [0, 1]})),
])
def test_hub_formats_round_trip_and_peft_refuses_them(name: str, expected: dict, tmp_path: Path) -> None:
    adapter = hub_format_adapters()[name]
    folder = write_adapter(adapter, tmp_path / name)
    again = read_adapter(folder)
    spec = again.spec
    assert (spec.method, spec.rank, spec.alpha, spec.targets, spec.options, spec.base_model) == (
        expected["method"], expected["rank"], expected["alpha"], expected["targets"], expected["options"], "tiny")
    assert_identical(again.tensors, adapter.tensors)
    assert again.config == adapter.config and adapter_digest(again) == adapter_digest(adapter)
    with warnings.catch_warnings(), pytest.raises(KeyError, match=name.upper()):
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(tiny_base(), folder)


# ---------------------------------------------------------------------------------------------------------------
# The canonical digest


@pytest.fixture
def lora(peft_folders: dict[str, Path]) -> Adapter:
    return read_adapter(peft_folders["lora"])


def test_digest_ignores_tensor_order_metadata_and_where_it_was_saved(lora: Adapter, tmp_path: Path) -> None:
    reordered = dict(reversed(list(lora.tensors.items())))
    assert list(reordered) != list(lora.tensors)
    folder = tmp_path / "resaved"
    folder.mkdir()
    config = {**lora.config, "base_model_name_or_path": "/elsewhere/base", "revision": "v2", "peft_version": "0.1",
              "inference_mode": not lora.config["inference_mode"], "auto_mapping": {"base_model_class": "X"}}
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    save_file(reordered, folder / WEIGHTS_NAME, metadata={"format": "pt", "saved_by": "someone else"})
    assert {key for key in config if config[key] != lora.config.get(key)} <= VOLATILE_CONFIG_KEYS
    assert adapter_digest(read_adapter(folder)) == adapter_digest(lora)


@pytest.mark.parametrize("key", sorted(VOLATILE_CONFIG_KEYS))
def test_digest_ignores_each_volatile_config_key(key: str, lora: Adapter) -> None:
    changed = Adapter(config={**lora.config, key: "something/else"}, tensors=lora.tensors)
    assert adapter_digest(changed) == adapter_digest(lora)


def test_digest_ignores_the_order_of_module_sets(peft_folders: dict[str, Path], lora: Adapter) -> None:
    """PEFT keeps target, excluded and feed-forward modules as sets and saves them in hash-seed order, so the same
    adapter saved by two processes lists them differently."""
    flipped = Adapter(config={**lora.config, "target_modules": list(reversed(lora.config["target_modules"]))},
                      tensors=lora.tensors)
    assert flipped.config["target_modules"] != lora.config["target_modules"]
    assert adapter_digest(flipped) == adapter_digest(lora)

    ia3 = read_adapter(peft_folders["ia3"])
    config = {**ia3.config, "feedforward_modules": ["down_proj", "v_proj"], "exclude_modules": ["a", "b"]}
    swapped = {**config, "feedforward_modules": ["v_proj", "down_proj"], "exclude_modules": ["b", "a"]}
    assert adapter_digest(Adapter(config=config, tensors=ia3.tensors)) == adapter_digest(
        Adapter(config=swapped, tensors=ia3.tensors))


@pytest.mark.parametrize("change", [
    {"r": 8, "lora_alpha": 16},  # same effective scale, other config
    {"lora_alpha": 16},
    {"use_rslora": True},
    {"use_dora": True},
    {"target_modules": ["q_proj"]},
    {"fan_in_fan_out": True},
    {"task_type": "SEQ_CLS"},
    {"rank_pattern": {"q_proj": 4}},
])
def test_digest_changes_with_a_meaningful_config_key(change: dict, lora: Adapter) -> None:
    changed = Adapter(config={**lora.config, **change}, tensors=lora.tensors)
    assert adapter_digest(changed) != adapter_digest(lora)


def test_digest_changes_with_one_tensor_value_dtype_or_name(lora: Adapter) -> None:
    original = adapter_digest(lora)
    key = sorted(lora.tensors)[-1]
    nudged = lora.tensors[key].clone()
    nudged.view(-1)[7] = torch.nextafter(nudged.view(-1)[7], torch.tensor(float("inf")))
    variants = [
        {**lora.tensors, key: nudged},
        {**lora.tensors, key: lora.tensors[key].to(torch.float64)},
        {**lora.tensors, key: lora.tensors[key].reshape(-1)},
        {**{k: v for k, v in lora.tensors.items() if k != key}, key.replace("v_proj", "k_proj"): lora.tensors[key]},
    ]
    digests = {adapter_digest(Adapter(config=lora.config, tensors=tensors)) for tensors in variants}
    assert len(digests) == len(variants) and original not in digests


def test_digest_of_a_fixed_adapter_never_changes() -> None:
    """Digests are store addresses and registry identities: a change of the algorithm orphans every stored
    artifact, so it must be deliberate (and come with a migration)."""
    adapter = Adapter(
        config={"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["v_proj", "q_proj"],
                "base_model_name_or_path": "anything", "task_type": "CAUSAL_LM"},
        tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.arange(8.0).reshape(2, 4),
                 "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": -torch.arange(8.0).reshape(4, 2)})
    # sha256 of the canonical config JSON (volatile keys dropped, module sets sorted, sorted keys, no spaces), then
    # per tensor in name order the JSON [name, dtype, shape] and its little-endian bytes; checked with numpy.
    assert adapter_digest(adapter) == "1d4706ee5b436a728028d13d31266d3ea2b01cbc3d20f0a1248ff8b0246b1733"


# ---------------------------------------------------------------------------------------------------------------
# Bad folders: one line, InvalidArtifact, nothing stored or registered


def set_config(**values: Any) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / CONFIG_NAME).read_text())
        config.update(values)
        (folder / CONFIG_NAME).write_text(json.dumps(config))
    return change


def set_tensor(key_part: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS_NAME)
        key = next(k for k in sorted(tensors) if key_part in k)
        tensors[key] = make(tensors[key])
        save_file(tensors, folder / WEIGHTS_NAME)
    return change


def truncate(folder: Path) -> None:
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def with_nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[3] = float("nan")
    return tensor


BAD_FOLDERS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "missing config": ("lora", lambda f: (f / CONFIG_NAME).unlink(), "has no adapter_config.json"),
    "missing weights": ("lora", lambda f: (f / WEIGHTS_NAME).unlink(), "has no adapter_model.safetensors"),
    "config not JSON": ("lora", lambda f: (f / CONFIG_NAME).write_text("{'peft_type': 'LORA',"), "is not valid JSON"),
    "config not an object": ("lora", lambda f: (f / CONFIG_NAME).write_text("[1, 2]"), "must hold a JSON object"),
    "config a folder": ("lora", lambda f: ((f / CONFIG_NAME).unlink(), (f / CONFIG_NAME).mkdir()), "cannot read"),
    "no peft_type": ("lora", set_config(peft_type=None), "has no peft_type"),
    "unknown peft_type": ("lora", set_config(peft_type="NOT_A_PEFT_TYPE"),
                          "unknown adapter method 'NOT_A_PEFT_TYPE'"),
    "lora rank": ("lora", set_config(r=8), "tensors have rank 4 but the config says r=8"),
    "lora rank_pattern": ("lora_patterns", set_config(rank_pattern={"q_proj": 5}), "the config says r=5"),
    "lora A/B do not chain": ("lora", set_tensor("lora_B", lambda t: t[:, :3].contiguous()), "do not chain"),
    "lora B is 1-D": ("lora", set_tensor("lora_B", lambda t: t[:, 0].contiguous()), "do not chain"),
    "adalora rank": ("adalora", set_config(init_r=5), "tensors have rank 6 but the config says 5"),
    "loha rank": ("loha", set_config(r=3), "hada_w1_b has shape (4, "),
    "lokr rank": ("lokr", set_config(r=3), "not rank 3 as the config says"),
    "prompt rows": ("prompt_tuning", set_config(num_virtual_tokens=7), "has 4 rows but num_virtual_tokens=7"),
    "truncated weights": ("lora", truncate, "is not a readable safetensors file"),
    "empty weights": ("lora", lambda f: (f / WEIGHTS_NAME).write_bytes(b""), "is not a readable safetensors file"),
    "NaN weight": ("lora", set_tensor("lora_A", with_nan), "contains NaN or infinite values"),
    "infinite weight": ("dora", set_tensor("magnitude", lambda t: t.fill_(float("inf"))), "NaN or infinite"),
    "no method tensors": ("lora", lambda f: save_file({"other": torch.ones(2)}, f / WEIGHTS_NAME),
                          "no lora tensors found"),
}


@pytest.mark.parametrize("bad", sorted(BAD_FOLDERS))
def test_bad_folders_are_refused_in_one_line_and_nothing_is_stored(bad: str, peft_folders: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    case, damage, message = BAD_FOLDERS[bad]
    folder = copy_of(peft_folders[case], tmp_path)
    damage(folder)
    with pytest.raises(InvalidArtifact, match=re.escape(message)) as error:
        read_adapter(folder)
    assert "\n" not in str(error.value)

    hub = Hub(home=tmp_path / "home")
    with pytest.raises(InvalidArtifact, match=re.escape(message)):
        hub.register(folder, name="bad", base=None)
    assert hub.list(Query(include_yanked=True)) == []
    assert [p for p in (tmp_path / "home").rglob("*") if p.is_file() and "registry.db" not in p.name] == []


# Paths whose opening the audit hook records. An audit hook cannot be removed, so it is added once and stays tiny.
WATCHED: dict[str, list[str]] = {}


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and WATCHED and str(args[0]) in WATCHED:
        WATCHED[str(args[0])].append(event)


def watch_opens(path: Path) -> list[str]:
    if not getattr(watch_opens, "installed", False):
        sys.addaudithook(_record_opens)
        watch_opens.installed = True
    return WATCHED.setdefault(str(path), [])


class _Detonates:
    """Unpickling this creates the marker folder: proof that someone loaded the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("beside_safetensors", [False, True])
def test_pickle_files_are_never_opened(beside_safetensors: bool, peft_folders: dict[str, Path],
                                       tmp_path: Path) -> None:
    folder = copy_of(peft_folders["lora"], tmp_path)
    if not beside_safetensors:
        (folder / WEIGHTS_NAME).unlink()
    marker = tmp_path / "unpickled"
    pickled = folder / "adapter_model.bin"
    pickled.write_bytes(pickle.dumps(_Detonates(marker)))
    opened = watch_opens(pickled)
    try:
        if beside_safetensors:
            # The safetensors file is what the hub reads; the pickle beside it is ignored.
            assert read_adapter(folder).spec.method == "lora"
        else:
            with pytest.raises(InvalidArtifact, match="is a pickle file, which the hub never opens") as error:
                read_adapter(folder)
            assert "\n" not in str(error.value)
        assert opened == [] and not marker.exists()
    finally:
        del WATCHED[str(pickled)]


def test_write_refuses_a_config_json_cannot_hold(lora: Adapter, tmp_path: Path) -> None:
    with pytest.raises(InvalidArtifact, match="config value nan is not finite"):
        write_adapter(Adapter(config={**lora.config, "lora_dropout": float("nan")}, tensors=lora.tensors),
                      tmp_path / "out")
    assert not (tmp_path / "out" / CONFIG_NAME).exists() and not (tmp_path / "out" / WEIGHTS_NAME).exists()
