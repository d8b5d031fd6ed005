"""Truthful Hub repos (immutable version tags, real base model ids, cards per format), repos holding adapters in
folders, and pulls that never add to a local line that came from elsewhere."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import yaml
from hubserver import HubServer
from huggingface_hub import HfApi
from test_remote_hostile import BASE, TOKEN, hub_card, peft_files, tiny_lora

from hub.client import Hub
from hub.errors import Conflict, HubError, NotFound, QueryError
from hub.formats import adapter_digest
from hub.registry import Metric
from hub.remote import Remote, hub_repo_name_problem, model_card, parse_remote_ref


@pytest.fixture
def server():
    with HubServer(tokens={TOKEN: "alice"}) as srv:
        yield srv


@pytest.fixture
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Hub:
    """a@1 and a@2, trained on a base at the relative path models/base (which looks like a Hub id)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    hub = Hub(home=tmp_path / "source")
    hub.register(tiny_lora(1, base_model=str(tmp_path / "models" / "base")), name="a", base=BASE,
                 base_name="models/base", metrics=[Metric(key="accuracy", value=0.8, dataset="date", split="test")])
    hub.register(tiny_lora(2), name="a", base=BASE, base_name="models/base")
    return hub


def card_yaml(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


# ------------------------------------------------------------------------------------------ 7. truthful repos
def test_version_tags_never_move_and_alias_tags_that_would_are_skipped(server, source, caplog, monkeypatch):
    remote = Remote(source, endpoint=server.url, token=TOKEN)
    first = remote.push("a@1", "alice/a")
    # The registry now refuses such aliases; a registry written before may still hold them.
    real_get = source.get
    monkeypatch.setattr(source, "get", lambda ref: dataclasses.replace(
        real_get(ref), aliases=["v1", "main", "HEAD", "prod"] if ref == "a@2" else real_get(ref).aliases))
    second = remote.push("a@2", "alice/a")
    assert server.resolve("alice/a", "v1") == first.commit  # untouched
    assert server.resolve("alice/a", "prod") == second.commit
    assert second.alias_tags == ("prod",) and second.skipped_aliases == ("v1", "main", "HEAD")
    assert all(f"alias {a} of a@2 is not pushed" in caplog.text for a in second.skipped_aliases)
    tags = {t.name for t in HfApi(endpoint=server.url, token=TOKEN).list_repo_refs("alice/a").tags}
    assert tags == {"v1", "v2", "prod"}
    # Aliases that are not version tags may move.
    monkeypatch.setattr(source, "get", lambda ref: dataclasses.replace(real_get(ref), aliases=["prod"]))
    assert remote.push("a@1", "alice/a").alias_tags == ("prod",)
    assert server.resolve("alice/a", "prod") == first.commit


def test_skipped_alias_helper_refuses_version_tags_branches_and_refs():
    from hub.remote.client import alias_tag_problem

    assert "version tag" in alias_tag_problem("v3", set())
    assert "branch" in alias_tag_problem("dev", {"main", "dev"})
    assert "git ref" in alias_tag_problem("HEAD", set())
    assert "git does not accept" in alias_tag_problem("x.lock", set())
    assert alias_tag_problem("prod", {"main"}) is None


def test_local_base_path_never_reaches_the_repo(tmp_path, server, source, monkeypatch):
    # Pushed from another folder, where the relative "models/base" it was registered with reads as a Hub id.
    monkeypatch.chdir(tmp_path / "models")
    Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a")
    files = server.files("alice/a", "v1")
    card = files["README.md"].decode()
    config = json.loads(files["adapter_config.json"])
    assert str(tmp_path) not in card and "models/base" not in card
    assert "base_model" not in card_yaml(card) and "base_name" not in card_yaml(card)["adapter_hub"]
    assert "base_model_name_or_path" not in config
    assert "a base model not published on the Hub" in card


def test_explicit_base_model_goes_to_card_and_config(server, source):
    Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a", base_model="HuggingFaceTB/SmolLM2-135M")
    files = server.files("alice/a", "v1")
    data = card_yaml(files["README.md"].decode())
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M" and data["base_model_relation"] == "adapter"
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    assert data["library_name"] == "peft"
    result = data["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.8} and result["dataset"]["name"] == "date"
    with pytest.raises(QueryError):
        Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a", base_model="models/base")


def test_hub_formats_get_the_hubs_snippet_not_peft(source):
    lora = source.get("a@1")
    version = dataclasses.replace(lora, method="bitfit", config={**lora.config, "peft_type": "BITFIT"})
    card = model_card(version, repo_id="alice/a")
    assert "library_name" not in card_yaml(card) and "from hub import Hub, activate" in card
    assert "PeftModel" not in card
    assert "PeftModel.from_pretrained" in model_card(source.get("a@1"), repo_id="alice/a")


@pytest.mark.parametrize("name", ["date-", "date--v2", "x" * 120, "date.git"])
def test_names_the_hub_refuses_are_one_line_before_any_request(tmp_path, server, name, monkeypatch):
    monkeypatch.setenv("HUB_REMOTE_NAMESPACE", "alice")
    hub = Hub(home=tmp_path / "names")
    hub.register(tiny_lora(3), name=name, base=BASE)
    assert hub_repo_name_problem(name)
    with pytest.raises(QueryError, match="cannot name a Hub repository") as caught:
        Remote(hub, endpoint=server.url, token=TOKEN).push(f"{name}@1")
    assert "\n" not in str(caught.value) and server.requests == []
    with pytest.raises(QueryError):
        Remote(hub, endpoint=server.url, token=TOKEN).push(f"{name}@1", "alice/a--b")
    assert server.requests == []
    assert hub_repo_name_problem("date-v2") is None


# ------------------------------------------------------------------------------------------- 8. subfolders
def seed_folders(server: HubServer, tmp_path: Path) -> dict[str, str]:
    files, digests = {}, {}
    for i, folder in enumerate(["", "math", "code/python"]):  # "": an adapter at the repo's root too
        adapter = tiny_lora(20 + i)
        digests[folder] = adapter_digest(adapter)
        for name, data in peft_files(adapter, tmp_path / (folder or "root")).items():
            files[f"{folder}/{name}" if folder else name] = data
    server.seed("alice/experts", {**files, "README.md": b"# several adapters\n"}, tags=("v1",))
    return digests


def test_adapters_in_folders_are_listed_and_pulled(tmp_path, server):
    digests = seed_folders(server, tmp_path)
    remote = Remote(Hub(home=tmp_path / "target"), endpoint=server.url, token=TOKEN)
    assert remote.adapters("alice/experts") == ["", "code/python", "math"]
    repo_id, subfolder, revision = parse_remote_ref("alice/experts/code/python@v1")
    pulled = remote.pull(repo_id, revision, subfolder=subfolder)
    assert pulled.version.ref == "experts-code-python@1" and pulled.version.digest == digests["code/python"]
    assert pulled.subfolder == "code/python"
    assert {r.repo_id for r in remote.hub.registry.remotes("experts-code-python@1")} == {"alice/experts/code/python"}
    assert remote.pull("alice/experts", subfolder="math").version.digest == digests["math"]
    assert remote.pull("alice/experts").version.digest == digests[""]
    with pytest.raises(NotFound, match="no adapter_config.json there") as caught:
        remote.pull("alice/experts", subfolder="code")  # a folder, but no adapter in it
    assert "--folders" in str(caught.value) and str(tmp_path) not in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("alice/a", ("alice/a", None, None)),
    ("alice/a@v2", ("alice/a", None, "v2")),
    ("alice/a/x/y@refs/pr/1", ("alice/a", "x/y", "refs/pr/1")),
])
def test_parse_remote_ref(text, expected):
    assert parse_remote_ref(text) == expected


@pytest.mark.parametrize("text", ["alice", "alice/a@", "alice/a/../b", "alice/a--b", "alice/a/x y", "alice/a/x\n",
                                  "alice/a@v1\n"])
def test_parse_remote_ref_refuses_malformed(text):
    with pytest.raises(QueryError):
        parse_remote_ref(text)


@pytest.mark.parametrize(("fields", "problem"), [
    ({"name": "date\n"}, r"adapter_hub\.name: 'date\\n' is not an adapter name"),
    ({"name": "date/../../x"}, r"adapter_hub\.name"),
    ({"digest": "\n"}, r"adapter_hub\.digest"),  # after the files' own digest
    ({"lineage": [{"name": "p", "number": 1, "digest": "f" * 64 + "\n"}]}, r"lineage\[0\]\.digest"),
])
def test_card_values_the_registry_could_not_hold_are_refused_by_the_card_check(tmp_path, server, fields, problem):
    """A trailing newline (which ``re.match(...$)`` lets through) or a name that only starts like one is refused,
    naming the card field, before anything is stored."""
    adapter = tiny_lora(13)
    digest = adapter_digest(adapter) + fields.pop("digest", "")
    card = hub_card(digest, **fields)
    server.seed("alice/nl", {**peft_files(adapter, tmp_path / "files"), "README.md": card})
    target = Hub(home=tmp_path / "target")
    with pytest.raises(HubError, match=problem):
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/nl")
    assert target.registry.list(include_yanked=True) == [] and target.store.digests() == []
    with pytest.raises(QueryError, match="invalid folder"):
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/nl", subfolder="math\n")


# ---------------------------------------------------------------------------------- 9. lines from elsewhere
def test_pull_never_adds_to_a_local_line_from_elsewhere_unless_named(tmp_path, server, source):
    Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a")
    target = Hub(home=tmp_path / "target")
    target.register(tiny_lora(9), name="a", base=BASE)  # a local line called "a", not from alice/a
    remote = Remote(target, endpoint=server.url, token=TOKEN)
    with pytest.raises(Conflict, match="--name") as caught:
        remote.pull("alice/a", "v1")
    assert "\n" not in str(caught.value) and [v.ref for v in target.registry.list(name="a")] == ["a@1"]
    assert remote.pull("alice/a", "v1", name="from-alice").version.ref == "from-alice@1"


def test_pulling_again_from_the_same_repo_adds_to_the_line(tmp_path, server, source):
    remote = Remote(source, endpoint=server.url, token=TOKEN)
    remote.push("a@1", "alice/a")
    remote.push("a@2", "alice/a")
    target = Remote(Hub(home=tmp_path / "target"), endpoint=server.url, token=TOKEN)
    assert target.pull("alice/a", "v1").version.ref == "a@1"
    assert target.pull("alice/a", "v2").version.ref == "a@2"
    # and a line pushed from here may be pulled back into
    assert remote.pull("alice/a", "v2").version.ref == "a@2"


def test_card_name_is_validated_and_conflict_uses_it(tmp_path, server, caplog):
    adapter = tiny_lora(12)
    card = hub_card(adapter_digest(adapter), name="../../etc")
    server.seed("alice/odd", {**peft_files(adapter, tmp_path / "files"), "README.md": card}, tags=("v1",))
    caplog.set_level(logging.WARNING)
    with pytest.raises(HubError, match="adapter_hub.name"):
        Remote(Hub(home=tmp_path / "target"), endpoint=server.url, token=TOKEN).pull("alice/odd", "v1")
