"""Push and pull against the tests' own Hub-compatible server, with the real huggingface_hub client."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.file_download
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_llama_config
from hubserver import HubServer
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from cli.main import cli
from hub.client import Hub
from hub.errors import IntegrityError, InvalidArtifact, NotFound, QueryError, RemoteError
from hub.formats import adapter_digest, read_adapter
from hub.registry import Metric, Parent
from hub.remote import Remote

TOKEN = "hf_secret_token_for_tests"


@pytest.fixture
def server():
    with HubServer(tokens={TOKEN: "alice"}) as srv:
        yield srv


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "tiny-base"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    return folder


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.fixture
def source(tmp_path: Path, base_dir: Path) -> Hub:
    """A hub with a@1 (metrics, alias prod) and a@2 (lineage on a@1)."""
    hub = Hub(home=tmp_path / "source")
    hub.register(make_adapter(base_dir, tmp_path / "a1", 1), name="a", base=base_dir,
                 metrics=[Metric(key="accuracy", value=0.8, dataset="date", split="test")], tags=["demo"],
                 recipe={"method": "lora", "steps": 100, "seed": 3})
    hub.registry.set_alias("a@1", "prod")
    hub.register(make_adapter(base_dir, tmp_path / "a2", 2), name="a", base=base_dir, metrics={"accuracy": 0.9},
                 lineage=[Parent("a", 1, weight=1.0, strategy="continued", params={"steps": 50})])
    return hub


def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client sleeps between download retries; the tests need not wait for it.
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda _: None)


def summary(version) -> tuple:
    return (version.name, version.number, version.digest, version.method, version.rank,
            sorted((m.key, m.value, m.dataset, m.split) for m in version.metrics),
            [(p.name, p.number, p.digest, p.weight, p.strategy, p.params) for p in version.parents], version.base,
            version.recipe)


def test_pull_without_the_parent_keeps_the_version_and_drops_only_the_unknown_link(tmp_path, server, source,
                                                                                  caplog):
    Remote(source, endpoint=server.url, token=TOKEN).push("a@2", "alice/a")
    target = Hub(home=tmp_path / "target")
    with caplog.at_level(logging.WARNING, logger="hub.remote"):
        pulled = Remote(target, endpoint=server.url, token=TOKEN).pull("alice/a", "v2")
    assert pulled.version.ref == "a@2" and pulled.version.parents == []
    assert "lineage parent a@1 is not in this registry" in caplog.text


def test_push_then_pull_into_empty_home_rebuilds_the_registry(tmp_path, server, source, base_dir):
    remote = Remote(source, endpoint=server.url, token=TOKEN)
    first = remote.push("a@1", "alice/a")
    second = remote.push("a@2", "alice/a")
    assert (first.tag, second.tag) == ("v1", "v2") and first.uploaded and second.uploaded
    assert {r.repo_id for r in source.registry.remotes("a@2")} == {"alice/a"}

    target = Hub(home=tmp_path / "target")
    pulled_v1 = Remote(target, endpoint=server.url, token=TOKEN).pull("alice/a", "v1")
    pulled_main = Remote(target, endpoint=server.url, token=TOKEN).pull("alice/a")
    assert summary(pulled_v1.version) == summary(source.get("a@1"))
    assert summary(pulled_main.version) == summary(source.get("a@2"))
    assert [m.version.ref for m in target.compatible(base_dir)] == ["a@1", "a@2"]

    # The files on the server are plain PEFT: PEFT loads them at the tag, with the same tensors.
    folder = huggingface_hub.snapshot_download("alice/a", revision="v1", endpoint=server.url, token=TOKEN,
                                               cache_dir=tmp_path / "peft-cache")
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), folder)
    stored = source.load("a@1").tensors
    for key, tensor in stored.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                                 ".lora_B.default.weight")
        assert torch.equal(model.state_dict()[name], tensor)


def test_repushing_an_unchanged_version_uploads_nothing(server, source):
    remote = Remote(source, endpoint=server.url, token=TOKEN)
    remote.push("a@1", "alice/a")
    before = server.received_bytes
    again = remote.push("a@1", "alice/a")
    assert not again.uploaded
    assert server.received_bytes == before


def test_card_carries_hub_conventions_and_never_the_token(tmp_path, server, source, caplog):
    caplog.set_level(logging.DEBUG)
    Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a")
    card = server.files("alice/a", "v1")["README.md"].decode()
    assert "library_name: peft" in card and "adapter_hub:" in card and source.get("a@1").digest in card
    assert TOKEN not in card
    assert TOKEN not in caplog.text
    database = (tmp_path / "source" / "registry.db").read_bytes()
    assert TOKEN.encode() not in database


def test_corrupted_file_on_server_is_refused_and_leaves_nothing(tmp_path, server, source):
    Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a")
    server.corrupt("alice/a", "adapter_model.safetensors")
    target = Hub(home=tmp_path / "target")
    with pytest.raises((IntegrityError, InvalidArtifact)):
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/a", "v1")
    assert target.list() == []
    assert not any((tmp_path / "target" / "store").rglob("*.safetensors"))
    # Once the server serves the right bytes again, the pull completes (the bad copy was not cached).
    server.clear_faults()
    assert Remote(target, endpoint=server.url, token=TOKEN).pull("alice/a", "v1").version.number == 1


def test_download_cut_in_the_middle_is_a_clear_error_and_the_next_pull_completes(
        tmp_path, server, source, monkeypatch):
    no_sleep(monkeypatch)
    Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a")
    server.cut_next_download("alice/a", "adapter_model.safetensors", after_bytes=0, times=10)
    target = Hub(home=tmp_path / "target")
    with pytest.raises(RemoteError) as caught:
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/a", "v1")
    assert TOKEN not in str(caught.value)
    assert target.list() == []
    server.clear_faults()
    assert Remote(target, endpoint=server.url, token=TOKEN).pull("alice/a", "v1").version.ref == "a@1"


def test_pull_works_offline_from_the_cache(tmp_path, source):
    with HubServer(tokens={TOKEN: "alice"}) as srv:
        Remote(source, endpoint=srv.url, token=TOKEN).push("a@1", "alice/a")
        target = Hub(home=tmp_path / "target")
        Remote(target, endpoint=srv.url, token=TOKEN).pull("alice/a", "v1")
        url = srv.url
    fresh = Hub(home=tmp_path / "target", database_url=f"sqlite:///{tmp_path / 'other.db'}")
    pulled = Remote(fresh, endpoint=url, token=TOKEN).pull("alice/a", "v1")
    assert pulled.version.digest == source.get("a@1").digest


def test_plain_peft_repo_is_pulled_with_unknown_base(tmp_path, server, base_dir):
    from huggingface_hub import HfApi

    folder = make_adapter(base_dir, tmp_path / "plain", 5)
    api = HfApi(endpoint=server.url, token=TOKEN)
    api.create_repo("alice/plain-lora")
    api.upload_folder(repo_id="alice/plain-lora", folder_path=folder)
    target = Hub(home=tmp_path / "target")
    pulled = Remote(target, endpoint=server.url, token=TOKEN).pull("alice/plain-lora")
    assert pulled.version.ref == "plain-lora@1"
    assert pulled.version.base is None
    assert pulled.version.digest == adapter_digest(read_adapter(folder))
    # The publisher's local base path means nothing here: only a Hub model id is kept as the base's name.
    assert read_adapter(folder).spec.base_model and pulled.version.base_name is None
    assert not pulled.verified


def test_remote_errors_are_one_line(tmp_path, server, source):
    remote = Remote(source, endpoint=server.url, token="hf_wrong")
    with pytest.raises(RemoteError, match="authentication failed"):
        remote.push("a@1", "alice/a")
    with pytest.raises(NotFound):
        Remote(source, endpoint=server.url, token=TOKEN).pull("alice/missing")
    with pytest.raises(QueryError):
        Remote(source, endpoint=server.url, token=TOKEN).pull("../etc")


def test_cli_push_pull_and_remote_listing(tmp_path, server, source, base_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HUB_HOME", str(tmp_path / "source"))
    runner = CliRunner()
    pushed = runner.invoke(cli, ["push", "a@1", "--repo", "alice/a"])
    assert pushed.exit_code == 0, pushed.output
    listed = runner.invoke(cli, ["list", "--remote", "alice/a", "--compatible-with", str(base_dir)])
    assert listed.exit_code == 0, listed.output
    assert "v1" in listed.output and "exact" in listed.output
    monkeypatch.setenv("HUB_HOME", str(tmp_path / "target"))
    pulled = runner.invoke(cli, ["pull", "alice/a@v1"])
    assert pulled.exit_code == 0, pulled.output
    assert "a@1" in runner.invoke(cli, ["list"]).output
    missing = runner.invoke(cli, ["pull", "alice/nothing-here"])
    assert missing.exit_code == 1 and missing.output.startswith("error: ") and TOKEN not in missing.output
