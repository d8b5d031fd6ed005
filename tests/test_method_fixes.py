"""Issue #9's failures, each with the right value (PEFT 0.21.2 as the oracle where it is right): modules_to_save
heads, adapter-name keys, resized vocabularies, tied embeddings, svd's default rank, DoRA's name, malformed
configs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from alembic import command
from conftest import tiny_llama_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel
from peft_saved import save_peft
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from hub.client import Hub, Query
from hub.composition.merge import merge
from hub.errors import Incompatible, InvalidArtifact
from hub.formats import read_adapter
from hub.registry import upgrade
from hub.registry.database import alembic_config
from hub.runtime import attach, merge_into_base
from hub.sites.handle import shares_storage
from hub.train import Recipe, new_adapter

IDS = torch.tensor([[1, 5, 9, 33, 70, 101, 3]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_logits(base: Path, folder: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), folder).eval())


@pytest.fixture
def base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora(base: Path | torch.nn.Module, folder: Path, seed: int = 1, **options) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **{"target_modules": ["q_proj"], **options})
    return save_peft(base, config, folder, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# modules_to_save


def test_a_saved_head_is_swapped_in_as_peft_does_and_survives_stack_and_export(base: Path, tmp_path: Path) -> None:
    folder = lora(base, tmp_path / "head", modules_to_save=["lm_head"])
    hub = Hub(home=tmp_path / "home")
    hub.register(folder, name="head", base=base)
    hub.register(lora(base, tmp_path / "plain", seed=2), name="plain", base=base)
    assert [v.ref for v in hub.list(Query(name="head"))] == ["head@1"]

    model = LlamaForCausalLM.from_pretrained(base).eval()
    handle = hub.activate(model, "head@1")
    torch.testing.assert_close(logits(model), peft_logits(base, folder), rtol=0, atol=1e-5)
    handle.detach()
    assert torch.equal(logits(model), logits(LlamaForCausalLM.from_pretrained(base).eval()))

    stacked = attach(model, [hub.load("head@1"), hub.load("plain@1")], name=["head", "plain"])
    assert stacked.handles[0].to_adapter().tensors.keys() == read_adapter(folder).tensors.keys()
    stacked.detach()

    exported = hub.export("head@1", tmp_path / "exported")
    assert {k: v.tolist() for k, v in load_file(exported / "adapter_model.safetensors").items()} == {
        k: v.tolist() for k, v in load_file(folder / "adapter_model.safetensors").items()}
    torch.testing.assert_close(peft_logits(base, exported), peft_logits(base, folder), rtol=0, atol=0)


def test_a_sum_keeps_one_head_and_refuses_two(base: Path, tmp_path: Path) -> None:
    head = read_adapter(lora(base, tmp_path / "head", modules_to_save=["lm_head"]))
    other_head = read_adapter(lora(base, tmp_path / "head2", seed=3, modules_to_save=["lm_head"]))
    plain = read_adapter(lora(base, tmp_path / "plain", seed=2))
    merged = merge([head, plain], [0.5, 0.5]).adapter
    key = "base_model.model.lm_head.weight"
    assert torch.equal(merged.tensors[key], head.tensors[key])
    assert merged.config["modules_to_save"] == ["lm_head"]
    with pytest.raises(Incompatible, match=r"^adapters #0 and #1 each replace lm_head with their own trained copy"):
        merge([head, other_head], [0.5, 0.5])


# ---------------------------------------------------------------------------------------------------------------
# keys that keep the adapter name


def test_keys_with_the_adapter_name_are_read_as_peft_reads_them(base: Path, tmp_path: Path) -> None:
    folder = lora(base, tmp_path / "plain")
    named = tmp_path / "named"
    named.mkdir()
    (named / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, named / "adapter_model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(peft_logits(base, named), peft_logits(base, folder), rtol=0, atol=0)  # PEFT loads it
    adapter = read_adapter(named)
    assert adapter.tensors.keys() == tensors.keys()
    assert all(torch.equal(adapter.tensors[k], tensors[k]) for k in tensors)


# ---------------------------------------------------------------------------------------------------------------
# resized vocabularies


def test_an_adapter_for_a_resized_vocabulary_is_refused_at_register_and_never_listed(base: Path,
                                                                                       tmp_path: Path) -> None:
    resized = LlamaForCausalLM.from_pretrained(base)
    resized.resize_token_embeddings(136)
    folder = lora(resized, tmp_path / "resized", modules_to_save=["embed_tokens", "lm_head"])
    hub = Hub(home=tmp_path / "home")
    with pytest.raises(Incompatible, match=r"^adapter does not fit this base: needs a 136-row embedding at model"
                                           r".embed_tokens, the base has 128: resized vocabulary\? \(and \d more\)$"):
        hub.register(folder, name="resized", base=base)
    assert hub.list() == []
    # Registered with the base's fingerprint only (no shapes to check), it is still not listed as fitting.
    hub.register(folder, name="resized", base=hub.fingerprint(base))
    assert list(hub.compatible(base)) == []
    with pytest.raises(Incompatible, match="resized vocabulary"):
        hub.activate(LlamaForCausalLM.from_pretrained(base), "resized@1")


# ---------------------------------------------------------------------------------------------------------------
# tied embeddings


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_merging_into_a_tied_embedding_unties_it(tmp_path: Path, target: str) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
    base = tmp_path / "tied"
    folder = lora(base, tmp_path / "adapter", target_modules=[target])
    expected = peft_logits(base, folder)
    model = LlamaForCausalLM.from_pretrained(base).eval()
    embedding = model.get_input_embeddings().weight.detach().clone()
    assert shares_storage(model, model.lm_head.weight)
    attach(model, read_adapter(folder), name="a")
    merge_into_base(model, "a")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    untouched = model.get_input_embeddings().weight if target == "lm_head" else model.lm_head.weight
    assert torch.equal(untouched, embedding)
    assert not shares_storage(model, model.lm_head.weight) and not model.config.tie_word_embeddings


# ---------------------------------------------------------------------------------------------------------------
# defaults never contradict shapes


def test_svd_without_rank_caps_its_default_per_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128))
    wide = read_adapter(save_peft(model, LoraConfig(r=96, lora_alpha=96, target_modules=["q_proj"],
                                                    init_lora_weights=False), tmp_path / "wide", seed=1))
    narrow = read_adapter(lora(model, tmp_path / "narrow", seed=2))
    merged = merge([wide, narrow], [0.5, 0.5], strategy="svd").adapter  # the default rank 96 > 64
    exact = merge([wide, narrow], [0.5, 0.5]).adapter
    assert merged.spec.rank == 64 and merge([wide, narrow], [0.5, 0.5], strategy="svd").recipe["rank"] is None
    for path, params in exact.modules().items():
        mine = merged.modules()[path]
        torch.testing.assert_close(mine["lora_B.weight"] @ mine["lora_A.weight"],
                                   params["lora_B.weight"] @ params["lora_A.weight"], rtol=1e-4, atol=1e-5)
    with pytest.raises(Incompatible, match="rank 200 is larger than every module's summed rank"):
        merge([wide, narrow], [0.5, 0.5], strategy="svd", rank=200)


def test_a_default_rank_is_lowered_where_a_module_cannot_hold_it_and_an_explicit_one_is_refused() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                               num_key_value_heads=1))
    adapter = new_adapter(model, Recipe(method="lora"))  # default rank 8; k_proj/v_proj are 4×8
    assert adapter.modules()["model.layers.0.self_attn.k_proj"]["lora_A.weight"].shape[0] == 4
    assert adapter.modules()["model.layers.0.self_attn.q_proj"]["lora_A.weight"].shape[0] == 8
    read_adapter(_written(adapter))  # consistent with its own config (rank_pattern)
    with pytest.raises(Incompatible, match=r"LoRA rank 8 does not fit model.layers.0.self_attn.k_proj \(4×8\)"):
        new_adapter(model, Recipe(method="lora", rank=8))


def _written(adapter) -> Path:
    import tempfile

    from hub.formats import write_adapter

    return write_adapter(adapter, Path(tempfile.mkdtemp()) / "adapter")


# ---------------------------------------------------------------------------------------------------------------
# DoRA by name


def test_a_trained_dora_is_registered_and_listed_as_dora(base: Path, tmp_path: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(base)
    adapter = new_adapter(model, Recipe(method="dora", rank=2))
    assert adapter.method == "dora" and adapter.config["use_dora"] is True
    hub = Hub(home=tmp_path / "home")
    hub.register(adapter, name="d", base=base)
    assert [v.ref for v in hub.list(Query(method="dora"))] == ["d@1"]
    assert read_adapter(lora(base, tmp_path / "rs", use_rslora=True)).spec.variants == ("rslora",)


def test_variants_are_recorded_listed_and_filled_in_by_the_upgrade(base: Path, tmp_path: Path) -> None:
    """rsLoRA and named initializations are found by `--method <variant>` and shown in the JSON, and a registry
    made before revision 0006 gets them from its stored configs."""
    hub = Hub(home=tmp_path / "home")
    hub.register(lora(base, tmp_path / "rs", use_rslora=True), name="rs", base=base)
    pissa = lora(base, tmp_path / "pissa")
    config = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    hub.register(pissa, name="pissa", base=base)
    hub.register(lora(base, tmp_path / "plain"), name="plain", base=base)

    def found() -> dict[str, list[str]]:
        return {method: [v.ref for v in hub.list(Query(method=method))] for method in ("lora", "rslora", "pissa")}

    assert found() == {"lora": ["pissa@1", "plain@1", "rs@1"], "rslora": ["rs@1"], "pissa": ["pissa@1"]}
    assert hub.get("rs@1").to_dict()["variants"] == ["rslora"] and hub.get("plain@1").variants == []
    url = hub.settings.database_url
    command.downgrade(alembic_config(url), "0005")  # as a registry made by the release before variants
    upgrade(url)
    assert found() == {"lora": ["pissa@1", "plain@1", "rs@1"], "rslora": ["rs@1"], "pissa": ["pissa@1"]}
    hub.delete("rs@1")  # the version's variants go with it
    assert found()["rslora"] == []


# ---------------------------------------------------------------------------------------------------------------
# malformed configs: one line naming the field


@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return lora(LlamaForCausalLM(tiny_llama_config()), tmp_path_factory.mktemp("lora") / "lora")


def _with_config(source: Path, folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    (folder / "adapter_config.json").write_text(text)
    return folder


@pytest.mark.parametrize(("field", "value", "message"), [
    ("r", "eight", "adapter_config.json: r must be an integer >= 1, not 'eight'"),
    ("target_modules", 5, "adapter_config.json: target_modules must be a list of module names or a regular"
                          " expression, not 5"),
    ("rank_pattern", {"(": 2}, "adapter_config.json: rank_pattern must be an object whose keys are valid regular"
                               " expressions, not {'(': 2}"),
    ("alpha_pattern", {"q_proj": "x"}, "adapter_config.json: alpha_pattern must be an object from module patterns"
                                       " to a finite number, not {'q_proj': 'x'}"),
    ("lora_alpha", True, "adapter_config.json: lora_alpha must be a finite number, not True"),
    ("use_dora", "yes", "adapter_config.json: use_dora must be true or false, not 'yes'"),
])
def test_a_malformed_field_is_named_in_one_line(saved_lora: Path, tmp_path: Path, field: str, value: object,
                                                message: str) -> None:
    config = {**json.loads((saved_lora / "adapter_config.json").read_text()), field: value}
    with pytest.raises(InvalidArtifact) as raised:
        read_adapter(_with_config(saved_lora, tmp_path / "bad", json.dumps(config)))
    assert str(raised.value) == message


def test_a_deeply_nested_config_is_refused_in_one_line(saved_lora: Path, tmp_path: Path) -> None:
    config = json.loads((saved_lora / "adapter_config.json").read_text())
    for depth, expected in ((40, "nests deeper than 16 levels"), (100_000, "nests too deeply")):
        text = json.dumps(config)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
        with pytest.raises(InvalidArtifact, match=expected):
            read_adapter(_with_config(saved_lora, tmp_path / f"deep{depth}", text))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 100) | st.floats(allow_nan=True)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
FIELDS = ["r", "lora_alpha", "target_modules", "exclude_modules", "modules_to_save", "rank_pattern", "alpha_pattern",
          "layers_to_transform", "layers_pattern", "use_dora", "use_rslora", "lora_bias", "init_lora_weights", "bias",
          "lora_dropout", "fan_in_fan_out", "task_type", "peft_type", "base_model_name_or_path", "inference_mode"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=JSON)
def test_any_value_of_any_field_is_read_or_refused_in_one_line(saved_lora: Path, tmp_path: Path, field: str,
                                                               value: object) -> None:
    config = {**json.loads((saved_lora / "adapter_config.json").read_text()), field: value}
    folder = _with_config(saved_lora, tmp_path / "fuzz", json.dumps(config))
    try:
        read_adapter(folder)
    except InvalidArtifact as exc:
        assert "\n" not in str(exc) and (field in str(exc) or "tensors" in str(exc) or "module" in str(exc)
                                         or "peft_type" in str(exc) or "adapter method" in str(exc)), str(exc)
