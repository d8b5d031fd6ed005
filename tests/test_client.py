"""The Hub Python API on real folders: PEFT-saved adapters on tiny Llama bases saved with save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft_saved import assert_identical, peft_loaded_tensors, save_folders
from safetensors.torch import load_file

from hub.client import Hub, Query
from hub.errors import Conflict, DatabaseError, HubError, IntegrityError, InvalidArtifact, NotFound, QueryError
from hub.fingerprint import fingerprint_path
from hub.formats import CONFIG_NAME, WEIGHTS_NAME, Adapter, adapter_digest, read_adapter
from hub.registry import Metric


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_folders(tmp_path_factory.mktemp("client"))


@pytest.fixture
def hub(hub_home: Path) -> Hub:
    return Hub()


def store_files(hub: Hub) -> list[Path]:
    root = hub.settings.store_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_register_records_what_the_folder_and_base_say(hub: Hub, folders: dict[str, Path], hub_home: Path) -> None:
    result = hub.register(folders["lora4"], name="date", base=folders["base"], tags=["demo"],
                          metrics=[Metric("exact_match", 0.94, "date", "test"), Metric("accuracy", 0.9)],
                          description="dates")
    version = result.version
    assert result.created and version.ref == "date@1"
    assert (version.method, version.rank, version.alpha, version.targets) == ("lora", 4, 8.0, ["q_proj", "v_proj"])
    assert version.digest == adapter_digest(read_adapter(folders["lora4"]))
    assert version.base == fingerprint_path(folders["base"], use_cache=False)
    assert version.base_name == str(folders["base"]) and version.tags == ["demo"] and version.description == "dates"
    assert [(m.key, m.value, m.dataset, m.split) for m in version.metrics] == [
        ("accuracy", 0.9, None, None), ("exact_match", 0.94, "date", "test")]
    assert version.size_bytes == sum(t.numel() * 4 for t in load_file(folders["lora4"] / WEIGHTS_NAME).values())
    assert version.digest in hub.store
    # Everything lives under the hub's home, the fingerprint cache included.
    assert (hub_home / "registry.db").is_file() and (hub_home / "cache" / "fingerprints.json").is_file()


def test_a_hub_with_its_own_home_keeps_all_its_state_there(folders: dict[str, Path], hub_home: Path,
                                                          tmp_path: Path) -> None:
    hub = Hub(home=tmp_path / "elsewhere")
    hub.register(folders["lora4"], name="date", base=folders["base"])
    assert [m.version.ref for m in hub.compatible(folders["sibling"])] == ["date@1"]
    # (SQLite keeps registry.db-wal and registry.db-shm beside the database)
    assert {p.name.split("-")[0] for p in (tmp_path / "elsewhere").iterdir()} == {"cache", "registry.db", "store"}
    assert (tmp_path / "elsewhere" / "cache" / "fingerprints.json").is_file()
    assert not hub_home.exists()  # $HUB_HOME, the default home, is left alone


def test_registering_the_same_folder_twice_is_the_same_version(hub: Hub, folders: dict[str, Path]) -> None:
    first = hub.register(folders["lora4"], name="date", base=folders["base"], metrics={"accuracy": 0.9})
    stored = store_files(hub)
    again = hub.register(folders["lora4"], name="date", base=folders["base"], metrics={"f1": 0.5})
    assert (again.created, again.version.ref, again.version.digest) == (False, "date@1", first.version.digest)
    assert {m.key for m in again.version.metrics} == {"accuracy", "f1"}
    assert [v.ref for v in hub.list()] == ["date@1"] and store_files(hub) == stored
    # The same content read into memory and registered from there is still that version.
    assert hub.register(read_adapter(folders["lora4"]), name="date", base=folders["base"]).version.ref == "date@1"


def test_compatible_tells_exact_from_structural(hub: Hub, folders: dict[str, Path]) -> None:
    hub.register(folders["lora4"], name="a", base=folders["base"], metrics={"accuracy": 0.6})
    hub.register(folders["lora8"], name="b", base=folders["base"], metrics={"accuracy": 0.9})
    hub.register(folders["ia3"], name="c", base=folders["sibling"], metrics={"accuracy": 0.8})

    assert [(m.version.ref, m.exact) for m in hub.compatible(folders["base"])] == [
        ("a@1", True), ("b@1", True), ("c@1", False)]
    assert [(m.version.ref, m.exact) for m in hub.compatible(folders["sibling"])] == [
        ("c@1", True), ("a@1", False), ("b@1", False)]
    assert hub.compatible(folders["other"]) == []
    query = Query(method="lora", where=("accuracy>=0.7",))
    assert [m.version.ref for m in hub.compatible(folders["base"], query)] == ["b@1"]
    assert [m.version.ref for m in hub.compatible(hub.fingerprint(folders["base"]), Query(sort="accuracy"))] == [
        "b@1", "a@1", "c@1"]


def test_load_and_export_give_peft_the_registered_tensors(hub: Hub, folders: dict[str, Path],
                                                          tmp_path: Path) -> None:
    for key, base in (("lora4", "base"), ("ia3", "sibling")):
        version = hub.register(folders[key], name=key, base=folders[base]).version
        original = load_file(folders[key] / WEIGHTS_NAME)
        assert_identical(hub.load(key).tensors, original)

        exported = hub.export(f"{key}@1", tmp_path / "out" / key)
        assert sorted(p.name for p in exported.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
        config = json.loads((exported / CONFIG_NAME).read_text())
        assert "base_model_name_or_path" not in config  # a local path of this machine is never written out
        assert adapter_digest(read_adapter(exported)) == version.digest
        assert_identical(peft_loaded_tensors(folders[base], exported), original)


def test_export_never_overwrites(hub: Hub, folders: dict[str, Path], tmp_path: Path) -> None:
    hub.register(folders["lora4"], name="date", base=folders["base"])
    (tmp_path / "empty").mkdir()
    assert hub.export("date", tmp_path / "empty") == tmp_path / "empty"  # an empty folder is fine
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    for target in (busy, a_file):
        with pytest.raises(Conflict, match="exists and is not an empty folder"):
            hub.export("date", target)
    with pytest.raises(HubError, match="cannot write to .*file.txt/sub: ") as error:
        hub.export("date", a_file / "sub")
    assert "\n" not in str(error.value)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"] and a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty", "file.txt", "hub-home"]


def test_a_damaged_stored_artifact_is_never_served(hub: Hub, folders: dict[str, Path], tmp_path: Path) -> None:
    version = hub.register(folders["lora4"], name="date", base=folders["base"]).version
    weights = hub.store.path(version.digest) / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-4] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its digest"):
        hub.load("date")
    with pytest.raises(IntegrityError):
        hub.export("date", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_registry_that_cannot_be_opened_stores_nothing(folders: dict[str, Path], tmp_path: Path,
                                                        hub_home: Path) -> None:
    for url in ("postgresql+psycopg://nobody@127.0.0.1:1/x", "sqlite:////proc/no-such-dir/registry.db"):
        hub = Hub(database_url=url)
        with pytest.raises(DatabaseError) as error:
            hub.register(folders["lora4"], name="date", base=folders["base"])
        assert "\n" not in str(error.value)
        assert store_files(hub) == []


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"name": "bad name"}, QueryError, "invalid adapter name"),
    ({"metrics": {"accuracy": float("nan")}}, QueryError, "not a finite number"),
    ({"tags": ["has space"]}, InvalidArtifact, "invalid tag"),
    ({"base": "/no/such/base"}, NotFound, "no model folder or file at /no/such/base"),
])
def test_a_refused_registration_leaves_no_artifact(options: dict, error: type, message: str, hub: Hub,
                                                   folders: dict[str, Path]) -> None:
    values = {"name": "date", "base": folders["base"], **options}
    with pytest.raises(error, match=message):
        hub.register(folders["lora4"], name=values.pop("name"), **values)
    assert hub.list(Query(include_yanked=True)) == [] and store_files(hub) == []


def test_a_refused_registration_keeps_an_artifact_another_version_uses(hub: Hub, folders: dict[str, Path]) -> None:
    kept = hub.register(folders["lora4"], name="date", base=folders["base"]).version
    stored = store_files(hub)
    with pytest.raises(QueryError):
        hub.register(folders["lora4"], name="bad name", base=folders["base"])
    assert store_files(hub) == stored
    assert_identical(hub.load(kept.ref).tensors, load_file(folders["lora4"] / WEIGHTS_NAME))


def test_an_adapter_without_a_known_base(hub: Hub, folders: dict[str, Path]) -> None:
    """A plain PEFT adapter registered without its base: listed, but compatible with nothing."""
    adapter = read_adapter(folders["lora4"])
    named = Adapter(config={**adapter.config, "base_model_name_or_path": "someone/tiny-llama"},
                    tensors=adapter.tensors)
    version = hub.register(named, name="orphan", base=None).version
    assert version.base is None and version.base_name == "someone/tiny-llama"
    assert [v.ref for v in hub.list()] == ["orphan@1"] and hub.compatible(folders["base"]) == []
