"""The Hub is the API and the CLI a thin layer over it: every verb on ``Hub``, ``--json`` on every command that
prints a result, and teams sharing one registry share its files (a shared store folder, or the recorded remote)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from peft_saved import save_folders

from cli.main import cli
from hub.client import Hub, Query
from hub.errors import NotFound

CLI_DIR = Path(__file__).resolve().parent.parent / "cli"
# What cli/ may import from the package: the front door, its errors and the secret scrubber. Everything else
# (registry, store, remote, runtime, composition, training) is reached through Hub.
ALLOWED = {"hub.client", "hub.errors", "hub.secrets"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_folders(tmp_path_factory.mktemp("api"))


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_cli_reaches_the_package_only_through_hub() -> None:
    offenders = {f"{path.name}: {module}" for path in CLI_DIR.glob("*.py") for module in imported_modules(path)
                 if (module == "hub" or module.startswith("hub.")) and module not in ALLOWED}
    assert offenders == set()


def leaf_commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    found = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found.update(leaf_commands(command, f"{prefix}{name} "))
        else:
            found[f"{prefix}{name}"] = command
    return found


def test_every_command_that_prints_a_result_takes_json() -> None:
    missing = [name for name, command in leaf_commands(cli).items()
               if not any("--json" in param.opts for param in command.params if isinstance(param, click.Option))]
    assert missing == []


def run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_lifecycle_verbs_on_hub_and_cli_agree(hub_home: Path, folders: dict[str, Path]) -> None:
    hub = Hub()
    hub.register(folders["lora4"], name="date", base=folders["base"])
    hub.register(folders["lora8"], name="date", base=folders["base"])
    assert hub.alias("date@1", "prod").ref == "date@1"
    assert hub.get("date@prod").ref == "date@1"

    result = run("alias", "date@2", "prod", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["ref"] == "date@2"
    result = run("unalias", "date@prod", "--json")
    assert result.exit_code == 0 and json.loads(result.output) == {"name": "date", "alias": "prod", "removed": True}
    with pytest.raises(NotFound):
        hub.get("date@prod")

    result = run("yank", "date@2", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["status"] == "yanked"
    assert [v.ref for v in hub.list()] == ["date@1"]
    assert [v.ref for v in hub.list(Query(include_yanked=True))] == ["date@1", "date@2"]

    # Aliases become tags on a pushed repo: none may move a version tag, shadow a branch or be refused by git.
    for bad in ("v1", "main", "Master", "HEAD", "x.lock", "a..b", "prod."):
        result = CliRunner().invoke(cli, ["alias", "date@2", bad])
        assert result.exit_code == 1 and result.output.count("\n") == 1 and bad in result.output
    assert hub.get("date@2").aliases == [] and hub.get("date@1").aliases == []


def test_show_json_says_where_a_version_was_pushed(hub_home: Path, folders: dict[str, Path]) -> None:
    hub = Hub()
    hub.register(folders["lora4"], name="date", base=folders["base"])
    hub.registry.record_remote("date@1", repo_id="team/date", tag="v1", commit="c" * 40)
    shown = json.loads(run("show", "date@1", "--json").output)
    assert [(r["repo_id"], r["tag"]) for r in shown["remotes"]] == [("team/date", "v1")]
    assert "team/date@v1" in run("show", "date@1").output


def test_two_homes_sharing_a_database_and_a_store_folder_share_adapters(
        tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A team without a Hub: one registry database and one store folder on shared storage, two machines."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    store = tmp_path / "shared-store"
    alice = Hub(home=tmp_path / "alice", database_url=url, store=store)
    digest = alice.register(folders["lora4"], name="date", base=folders["base"]).version.digest

    monkeypatch.setenv("HUB_HOME", str(tmp_path / "bob"))
    monkeypatch.setenv("HUB_DATABASE_URL", url)
    monkeypatch.setenv("HUB_STORE", str(store))
    bob = Hub()
    assert bob.settings.store_dir == store
    assert bob.get("date@1").digest == digest
    result = run("export", "date@1", str(tmp_path / "exported"), "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "bob" / "store").exists()


def test_a_version_missing_here_with_no_remote_says_so_in_one_line(
        tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    Hub(home=tmp_path / "alice", database_url=url).register(folders["lora4"], name="date", base=folders["base"])
    monkeypatch.setenv("HUB_HOME", str(tmp_path / "bob"))
    monkeypatch.setenv("HUB_DATABASE_URL", url)
    monkeypatch.delenv("HUB_STORE", raising=False)
    result = CliRunner().invoke(cli, ["export", "date@1", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "no remote of it is recorded" in result.output
    assert not (tmp_path / "out").exists()


def test_two_homes_sharing_a_postgresql_registry_fetch_files_from_the_recorded_remote(
        tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, postgres_database: str) -> None:
    """Machine A registers and pushes; machine B, with its own empty store, lists, exports and activates the same
    version: its store fills itself from the recorded remote, verified by digest."""
    import torch
    from hubserver import HubServer
    from transformers import LlamaForCausalLM

    with HubServer(tokens={"hf_team_token": "team"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_team_token")
        monkeypatch.setenv("HUB_DATABASE_URL", postgres_database)
        monkeypatch.delenv("HUB_STORE", raising=False)
        alice = Hub(home=tmp_path / "alice", database_url=postgres_database)
        digest = alice.register(folders["lora4"], name="date", base=folders["base"]).version.digest
        alice.push("date@1", "team/date")

        monkeypatch.setenv("HUB_HOME", str(tmp_path / "bob"))
        bob = Hub()
        assert [v.ref for v in bob.list()] == ["date@1"] and digest not in bob.store
        result = CliRunner().invoke(cli, ["export", "date@1", str(tmp_path / "exported")])
        assert result.exit_code == 0, result.output
        assert "note: fetched date@1" in result.stderr and "team/date@v1" in result.stderr
        assert digest in bob.store and bob.load("date@1").tensors.keys() == alice.load("date@1").tensors.keys()

        # A third machine activates it straight away (no export first).
        carol = Hub(home=tmp_path / "carol", database_url=postgres_database)
        model = LlamaForCausalLM.from_pretrained(folders["base"]).eval()
        ids = torch.tensor([[1, 5, 9, 3]])
        with torch.no_grad():
            plain = model(ids).logits
            handle = carol.activate(model, "date@1")
            adapted = model(ids).logits
            handle.detach()
        assert digest in carol.store and not torch.allclose(plain, adapted)


def test_a_remote_copy_with_other_content_is_refused(
        tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from hubserver import HubServer

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with HubServer(tokens={"hf_team_token": "team"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_team_token")
        alice = Hub(home=tmp_path / "alice", database_url=url)
        alice.register(folders["lora4"], name="date", base=folders["base"])
        other = alice.register(folders["lora8"], name="other", base=folders["base"]).version
        pushed = alice.push("other@1", "team/other")
        # The registry says date@1 lives at the commit that actually holds other@1's files.
        alice.registry.record_remote("date@1", repo_id="team/other", tag="v1", commit=pushed.commit)
        bob = Hub(home=tmp_path / "bob", database_url=url)
        with pytest.raises(NotFound, match="digest") as error:
            bob.load("date@1")
        assert "\n" not in str(error.value) and other.digest not in bob.store


def test_delete_unyank_and_gc_on_hub_and_cli(hub_home: Path, folders: dict[str, Path]) -> None:
    hub = Hub()
    first = hub.register(folders["lora4"], name="date", base=folders["base"]).version
    hub.register(folders["lora8"], name="date", base=folders["base"])
    hub.yank("date@2")
    result = run("unyank", "date@2", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["status"] != "yanked"
    assert [v.ref for v in hub.list()] == ["date@1", "date@2"]

    # An artifact no version refers to (its registration failed after the store write) is garbage.
    stray = hub.register(folders["ia3"], name="stray", base=folders["sibling"]).version
    hub.registry.delete("stray@1")
    listed = json.loads(run("gc", "--json").output)
    assert listed["dry_run"] and [e["digest"] for e in listed["entries"] if e["kind"] == "artifact"] == [stray.digest]
    assert stray.digest in hub.store  # a dry run removes nothing

    result = run("delete", "date@1", "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["freed_bytes"] > 0 and first.digest not in hub.store
    assert [v.ref for v in hub.list(Query(include_yanked=True))] == ["date@2"]

    removed = hub.gc(dry_run=False)
    assert [e.digest for e in removed.entries if e.kind == "artifact"] == [stray.digest]
    assert stray.digest not in hub.store and hub.gc().entries == []
    # The next version of the line gets a new number: date@1 never comes back meaning other weights.
    assert hub.register(folders["lora4"], name="date", base=folders["base"]).version.ref == "date@3"


def test_register_warns_when_a_name_cannot_be_a_hub_repository(hub_home: Path, folders: dict[str, Path]) -> None:
    result = run("register", str(folders["lora4"]), "--name", "date--v2", "--base", str(folders["base"]))
    assert result.exit_code == 0 and result.stdout.startswith("registered date--v2@1")
    assert "warning: the name 'date--v2' contains '--' or '..'" in result.stderr and "--repo" in result.stderr
    clean = run("register", str(folders["lora4"]), "--name", "date", "--base", str(folders["base"]))
    assert clean.exit_code == 0 and "warning" not in clean.stderr


def test_pull_all_versions_of_a_repo_from_one_listing(tmp_path: Path, folders: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from hubserver import HubServer

    with HubServer(tokens={"hf_team_token": "team"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_team_token")
        source = Hub(home=tmp_path / "source")
        for key in ("lora4", "lora8"):
            source.register(folders[key], name="date", base=folders["base"])
            source.push(f"date@{1 if key == 'lora4' else 2}", "team/date")

        monkeypatch.setenv("HUB_HOME", str(tmp_path / "target"))
        result = run("pull", "team/date", "--all-versions", "--json")
        assert result.exit_code == 0, result.output
        pulled = json.loads(result.stdout)
        assert [p["version"]["ref"] for p in pulled] == ["date@1", "date@2"]
        target = Hub()
        assert [v.digest for v in target.list()] == [v.digest for v in source.list()]

        # Again: one listing of the refs, nothing downloaded, nothing new.
        before = len(server.requests)
        again = run("pull", "team/date", "--all-versions", "--json")
        assert again.exit_code == 0 and json.loads(again.stdout) == []
        assert [method for method, _ in server.requests[before:]] == ["GET"]
        source.register(folders["ia3"], name="date", base=folders["sibling"])
        source.push("date@3", "team/date")
        third = json.loads(run("pull", "team/date", "--all-versions", "--json").stdout)
        assert [p["version"]["ref"] for p in third] == ["date@3"]
