"""The `hub` command through click's CliRunner: output people read, JSON scripts parse, one-line errors (exit 1),
usage errors (exit 2), and nothing written when a command fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from peft_saved import assert_identical, peft_loaded_tensors, save_folders
from safetensors.torch import load_file

from cli.main import cli
from hub.client import Hub, Query
from hub.fingerprint import fingerprint_path
from hub.formats import CONFIG_NAME, WEIGHTS_NAME, adapter_digest, read_adapter
from hub.registry import head_revision

BAD_POSTGRES = "postgresql+psycopg://nobody@127.0.0.1:1/x"
BAD_SQLITE = "sqlite:////proc/no-such-dir/registry.db"  # cannot be created, not even by root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_folders(tmp_path_factory.mktemp("cli"))


def hub(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def ok(*args: object, env: dict[str, str] | None = None) -> str:
    result = hub(*args, env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


def table(stdout: str) -> list[dict[str, str]]:
    """Rows of a printed table as dicts, columns cut where the dashes under the header say."""
    lines = stdout.splitlines()
    spans, start = [], None
    for i, char in enumerate(lines[1] + " "):
        if char == "-" and start is None:
            start = i
        elif char != "-" and start is not None:
            spans.append((start, i))
            start = None
    cells = [[line[a:b].strip() for a, b in spans] for line in [lines[0], *lines[2:]]]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[1:]]


def refs(stdout: str) -> list[str]:
    return [row["version"] for row in table(stdout)]


@pytest.fixture
def populated(hub_home: Path, folders: dict[str, Path]) -> dict[str, Path]:
    """date@1 (LoRA r4, base), date@2 (LoRA r8, base), ia3@1 (IA3, sibling base), registered through the CLI."""
    ok("register", folders["lora4"], "--name", "date", "--base", folders["base"], "--tag", "demo",
       "--metric", "exact_match@date:test=0.94", "--metric", "accuracy=0.9")
    ok("register", folders["lora8"], "--name", "date", "--base", folders["base"], "--metric", "accuracy=0.7")
    ok("register", folders["ia3"], "--name", "ia3", "--base", folders["sibling"], "--metric", "accuracy=0.85",
       "--tag", "ia3")
    return folders


def state(home: Path) -> tuple:
    """Everything a failed command must leave as it was: the store's files and the registry's rows."""
    store = home / "store"
    files = sorted((str(p), p.stat().st_size) for p in store.rglob("*") if p.is_file()) if store.exists() else []
    registered = (home / "registry.db").exists()
    versions = [v.to_dict() for v in Hub(home=home).list(Query(include_yanked=True))] if registered else []
    return files, versions


# ---------------------------------------------------------------------------------------------------------------
# register, list, show, alias, yank, export, fingerprint, db


def test_register_prints_the_version_and_the_same_folder_twice_is_one_version(hub_home: Path,
                                                                             folders: dict[str, Path]) -> None:
    digest = adapter_digest(read_adapter(folders["lora4"]))
    args = ["register", folders["lora4"], "--name", "date", "--base", folders["base"],
            "--metric", "exact_match@date:test=0.94", "--tag", "demo"]
    assert ok(*args) == f"registered date@1 (lora, digest {digest[:12]})\n"
    before = state(hub_home)
    assert ok(*args) == f"already registered as date@1 (lora, digest {digest[:12]})\n"
    again = json.loads(ok(*args, "--json"))
    assert (again["created"], again["ref"], again["digest"]) == (False, "date@1", digest)
    assert state(hub_home) == before
    listed = json.loads(ok("list", "--json"))
    assert [v["ref"] for v in listed] == ["date@1"]
    assert listed[0]["metrics"] == [{"key": "exact_match", "value": 0.94, "dataset": "date", "split": "test"}]
    assert listed[0]["tags"] == ["demo"] and listed[0]["base_name"] == str(folders["base"])


def test_list_as_a_table_and_as_json(populated: dict[str, Path]) -> None:
    rows = table(ok("list"))
    assert [(r["version"], r["method"], r["rank"], r["targets"]) for r in rows] == [
        ("date@1", "lora", "4", "q_proj,v_proj"), ("date@2", "lora", "8", "k_proj,q_proj,v_proj"),
        ("ia3@1", "ia3", "", "down_proj,k_proj,v_proj")]
    assert rows[0]["metrics"] == "accuracy=0.9 exact_match@date=0.94"
    assert rows[0]["digest"] == adapter_digest(read_adapter(populated["lora4"]))[:12]
    listed = json.loads(ok("list", "--json"))
    assert [(v["ref"], v["method"], v["rank"]) for v in listed] == [("date@1", "lora", 4), ("date@2", "lora", 8),
                                                                     ("ia3@1", "ia3", None)]
    assert all("match" not in v for v in listed)


@pytest.mark.parametrize(("options", "expected"), [
    (["--method", "lora"], ["date@1", "date@2"]),
    (["--method", "ia3"], ["ia3@1"]),
    (["--where", "accuracy>=0.8"], ["date@1", "ia3@1"]),
    (["--where", "accuracy>=0.8", "--where", "exact_match@date:test>0.9"], ["date@1"]),
    (["--sort", "accuracy"], ["date@1", "ia3@1", "date@2"]),
    (["--sort", "-accuracy"], ["date@2", "ia3@1", "date@1"]),
    (["--min-rank", "8"], ["date@2"]),
    (["--max-rank", "4"], ["date@1"]),
    (["--tag", "ia3"], ["ia3@1"]),
    (["--name", "date", "--sort", "-accuracy"], ["date@2", "date@1"]),
])
def test_list_filters_and_sorts(options: list[str], expected: list[str], populated: dict[str, Path]) -> None:
    assert refs(ok("list", *options)) == expected
    assert [v["ref"] for v in json.loads(ok("list", *options, "--json"))] == expected


def test_list_compatible_with_a_base_tells_exact_from_structural(populated: dict[str, Path]) -> None:
    rows = table(ok("list", "--compatible-with", populated["base"]))
    assert [(r["version"], r["match"]) for r in rows] == [("date@1", "exact"), ("date@2", "exact"),
                                                          ("ia3@1", "structural")]
    from_sibling = json.loads(ok("list", "--compatible-with", populated["sibling"], "--json"))
    assert [(v["ref"], v["match"]) for v in from_sibling] == [("ia3@1", "exact"), ("date@1", "structural"),
                                                              ("date@2", "structural")]
    filtered = ok("list", "--compatible-with", populated["base"], "--where", "accuracy>=0.8", "--sort", "-accuracy")
    assert [(r["version"], r["match"]) for r in table(filtered)] == [("date@1", "exact"), ("ia3@1", "structural")]

    nothing = hub("list", "--compatible-with", populated["other"])  # other shapes: fits nothing
    assert (nothing.exit_code, nothing.stdout, nothing.stderr) == (0, "", "no matching versions\n")
    assert json.loads(ok("list", "--compatible-with", populated["other"], "--json")) == []


def test_show_alias_and_yank(populated: dict[str, Path]) -> None:
    shown = json.loads(ok("show", "date@1", "--json"))
    assert (shown["ref"], shown["method"], shown["rank"], shown["alpha"]) == ("date@1", "lora", 4, 8.0)
    assert shown["base"]["weights_hash"] == fingerprint_path(populated["base"], use_cache=False).weights_hash
    assert shown["config"]["target_modules"] and shown["status"] == "ready"
    text = ok("show", "date@1").splitlines()
    assert "       ref: date@1" in text and "    metric: exact_match = 0.94 [date] [test]" in text
    assert "   targets: q_proj, v_proj" in text

    assert ok("alias", "date@1", "prod") == "date@prod -> date@1\n"
    assert json.loads(ok("show", "date@prod", "--json"))["aliases"] == ["prod"]
    assert {r["version"]: r["aliases"] for r in table(ok("list"))} == {"date@1": "prod", "date@2": "", "ia3@1": ""}
    assert ok("alias", "date@2", "prod") == "date@prod -> date@2\n"  # an alias moves
    assert json.loads(ok("show", "date@prod", "--json"))["ref"] == "date@2"

    assert ok("yank", "date@2") == "yanked date@2\n"
    assert refs(ok("list")) == ["date@1", "ia3@1"]
    assert refs(ok("list", "--yanked")) == ["date@1", "date@2", "ia3@1"]
    assert refs(ok("list", "--compatible-with", populated["base"])) == ["date@1", "ia3@1"]
    assert json.loads(ok("show", "date", "--json"))["ref"] == "date@1"  # latest skips the yanked version
    assert json.loads(ok("show", "date@2", "--json"))["status"] == "yanked"  # still reachable by number


def test_export_gives_peft_the_registered_tensors(populated: dict[str, Path], tmp_path: Path) -> None:
    ok("alias", "date@1", "prod")
    out = tmp_path / "exported" / "date"
    assert ok("export", "date@prod", out) == f"exported date@prod to {out}\n"
    assert adapter_digest(read_adapter(out)) == json.loads(ok("show", "date@1", "--json"))["digest"]
    assert_identical(peft_loaded_tensors(populated["base"], out), load_file(populated["lora4"] / WEIGHTS_NAME))
    ia3_out = tmp_path / "exported" / "ia3"
    ok("export", "ia3", ia3_out)
    assert_identical(peft_loaded_tensors(populated["sibling"], ia3_out), load_file(populated["ia3"] / WEIGHTS_NAME))


def test_fingerprint(hub_home: Path, folders: dict[str, Path]) -> None:
    expected = fingerprint_path(folders["base"], use_cache=False)
    data = json.loads(ok("fingerprint", folders["base"], "--json"))
    assert data == {"weights_hash": expected.weights_hash, "shape_hash": expected.shape_hash,
                    "architecture": "LlamaForCausalLM", "num_parameters": expected.num_parameters}
    lines = ok("fingerprint", folders["base"]).splitlines()
    assert lines[:2] == [f"weights_hash  {expected.weights_hash}", f"shape_hash    {expected.shape_hash}"]
    assert not (hub_home / "registry.db").exists()  # no database needed, none created


def test_db_current_and_upgrade(hub_home: Path) -> None:
    head = head_revision()
    assert ok("db", "current") == "empty (empty; the hub creates the schema on first use)\n"
    assert ok("db", "upgrade") == f"database at revision {head}\n"
    assert ok("db", "current") == f"{head} (up to date)\n"
    assert ok("db", "upgrade") == f"database at revision {head}\n"  # idempotent


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line, exit 1, nothing written


def corrupt_copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    data = (target / WEIGHTS_NAME).read_bytes()
    (target / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    return target


def fresh_copy(folder: Path, target: Path) -> Path:
    """A valid LoRA that is not registered yet (another alpha: another digest)."""
    shutil.copytree(folder, target)
    config = json.loads((target / CONFIG_NAME).read_text())
    (target / CONFIG_NAME).write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    return target


ERRORS = [
    (["show", "nope"], None, "error: no adapter named 'nope'"),
    (["show", "dat"], None, "error: no adapter named 'dat' (did you mean date?)"),
    (["show", "date@9"], None, "error: date has no version 9 (versions 1..2)"),
    (["show", "date@staging"], None, "error: date has no alias 'staging'"),
    (["show", "date@"], None, "error: "),
    (["alias", "nope@1", "prod"], None, "error: no adapter named 'nope'"),
    (["alias", "date@1", "latest"], None, "error: "),
    (["yank", "date@7"], None, "error: date has no version 7"),
    (["export", "nope", "{tmp}/out"], None, "error: no adapter named 'nope'"),
    (["export", "date@1", "{busy}"], None, "error: {busy} exists and is not an empty folder"),
    (["list", "--where", "accuracy>>0.8"], None, "error: invalid metric condition 'accuracy>>0.8'"),
    (["list", "--sort", "-"], None, "error: invalid sort"),
    (["list", "--compatible-with", "/no/such/base"], None, "error: no model folder or file at /no/such/base"),
    (["fingerprint", "/no/such/base"], None, "error: no model folder or file at /no/such/base"),
    (["register", "{corrupt}", "--name", "x", "--base", "{base}"], None, "is not a readable safetensors file"),
    (["register", "{tmp}/missing", "--name", "x", "--base", "{base}"], None, "missing is not a folder"),
    (["register", "{fresh}", "--name", "x", "--base", "/no/such/base"], None, "error: no model folder or file at"),
    (["register", "{fresh}", "--name", "bad name", "--base", "{base}"], None, "error: invalid adapter name"),
    (["register", "{fresh}", "--name", "x", "--base", "{base}", "--metric", "accuracy=nan"], None,
     "not a finite number"),
    (["register", "{fresh}", "--name", "x", "--base", "{base}"], BAD_POSTGRES,
     "error: registry database postgresql+psycopg://nobody@127.0.0.1:1/x: connection failed"),
    (["register", "{fresh}", "--name", "x", "--base", "{base}"], BAD_SQLITE,
     "error: cannot create the folder for /proc/no-such-dir/registry.db"),
    (["list"], BAD_POSTGRES, "error: registry database postgresql+psycopg://nobody@127.0.0.1:1/x: "),
    (["show", "date"], BAD_SQLITE, "error: cannot create the folder for"),
    (["db", "upgrade"], BAD_POSTGRES, "error: registry database postgresql+psycopg://nobody@127.0.0.1:1/x: "),
    (["db", "current"], BAD_SQLITE, "error: cannot create the folder for"),
]


@pytest.mark.parametrize(("args", "database_url", "message"), ERRORS,
                         ids=[" ".join(args) + (" [bad database]" if url else "") for args, url, _ in ERRORS])
def test_errors_are_one_line_exit_1_and_write_nothing(args: list[str], database_url: str | None, message: str,
                                                      populated: dict[str, Path], hub_home: Path,
                                                      tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    paths = {**{k: str(v) for k, v in populated.items()}, "tmp": str(tmp_path), "busy": str(busy),
             "corrupt": str(corrupt_copy(populated["lora8"], tmp_path / "corrupt")),
             "fresh": str(fresh_copy(populated["lora8"], tmp_path / "fresh"))}
    assert adapter_digest(read_adapter(paths["fresh"])) not in Hub().store
    before = state(hub_home)
    result = hub(*[a.format(**paths) for a in args], env={"HUB_DATABASE_URL": database_url} if database_url else None)

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # handled: no traceback
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(**paths) in lines[0], lines
    assert state(hub_home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "corrupt", "fresh", "hub-home"]
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("args", [
    ["register", "{lora4}", "--base", "{base}"],  # no --name
    ["register", "{lora4}", "--name", "x", "--base", "{base}", "--metric", "accuracy"],
    ["register", "{lora4}", "--name", "x", "--base", "{base}", "--metric", "accuracy=high"],
    ["register", "{lora4}", "--name", "x", "--base", "{base}", "--metric", "@date=0.5"],
    ["list", "--min-rank", "eight"],
    # click's int read '١' as 1 and '1_0' as 10; a seed past 64 bits overflowed inside torch (internal error).
    ["compose", "date@1", "date@2", "--strategy", "svd", "--rank", "١", "--name", "x"],
    ["compose", "date@1", "date@2", "--strategy", "dare_linear", "--density", "0.5", "--seed",
     "99999999999999999999", "--name", "x"],
    ["train", "x", "--task", "date", "--base", "{base}", "--steps", "1_0"],
    ["list", "--bogus"],
    ["show"],
    ["export", "date@1"],
    ["frobnicate"],
    ["db", "downgrade"],
])
def test_usage_errors_exit_2_and_write_nothing(args: list[str], populated: dict[str, Path], hub_home: Path) -> None:
    before = state(hub_home)
    result = hub(*[a.format(**{k: str(v) for k, v in populated.items()}) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Usage:" in result.stderr and "Traceback" not in result.stderr
    assert state(hub_home) == before


def test_registry_commands_start_without_torch(populated: dict[str, Path], hub_home: Path) -> None:
    """`hub list` and friends never import torch or transformers: they start in about a second."""
    script = textwrap.dedent("""
        import sys
        from click.testing import CliRunner
        from cli.main import cli
        for args in (["list"], ["list", "--json", "--where", "accuracy>=0.5"], ["show", "date@1"],
                     ["alias", "date@1", "prod"], ["yank", "date@2"], ["db", "current"], ["show", "nope"]):
            result = CliRunner().invoke(cli, args)
            print(result.exit_code, end=" ")
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft")))
    """)
    env = {**os.environ, "HUB_HOME": str(hub_home)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0 0 0 0 0 0 1 []"


def test_the_installed_command_prints_errors_without_a_traceback(tmp_path: Path) -> None:
    command = Path(sys.executable).parent / "hub"
    env = {**os.environ, "HUB_HOME": str(tmp_path / "home"), "HUB_DATABASE_URL": BAD_POSTGRES}
    done = subprocess.run([str(command), "list"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: registry database {BAD_POSTGRES}: connection failed")
    assert not (tmp_path / "home").exists()


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL and the real SmolLM2


def test_the_whole_flow_on_postgresql(postgres_database: str, folders: dict[str, Path], hub_home: Path,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_DATABASE_URL", postgres_database)
    head = head_revision()
    assert ok("db", "current") == "empty (empty; the hub creates the schema on first use)\n"
    assert ok("db", "upgrade") == f"database at revision {head}\n"
    ok("register", folders["lora4"], "--name", "date", "--base", folders["base"], "--metric", "accuracy=0.9")
    assert ok("register", folders["lora4"], "--name", "date", "--base", folders["base"]).startswith(
        "already registered as date@1")
    ok("register", folders["ia3"], "--name", "ia3", "--base", folders["sibling"], "--metric", "accuracy=0.5")
    listed = json.loads(ok("list", "--compatible-with", folders["base"], "--where", "accuracy>=0.4", "--json"))
    assert [(v["ref"], v["match"]) for v in listed] == [("date@1", "exact"), ("ia3@1", "structural")]
    ok("export", "date", tmp_path / "out")
    assert_identical(peft_loaded_tensors(folders["base"], tmp_path / "out"), load_file(folders["lora4"] / WEIGHTS_NAME))
    assert ok("db", "current") == f"{head} (up to date)\n"
    assert not (hub_home / "registry.db").exists()


@pytest.mark.slow
def test_a_peft_lora_for_smollm2_end_to_end(smollm2_dir: Path, hub_home: Path, tmp_path: Path) -> None:
    """A PEFT-saved LoRA on the real SmolLM2 (q_proj, v_proj, r=8, B non-zero): registered with metrics, listed as
    exact for its base, exported, and loaded by PEFT with the very same tensors."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    def smollm2():
        return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(smollm2(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
        model.save_pretrained(tmp_path / "date-lora")
    del model
    saved = load_file(tmp_path / "date-lora" / WEIGHTS_NAME)
    assert len(saved) == 30 * 2 * 2 and all(bool(t.ne(0).any()) for t in saved.values())

    out = ok("register", tmp_path / "date-lora", "--name", "date", "--base", smollm2_dir,
             "--metric", "exact_match@date:test=0.94", "--tag", "smollm2")
    assert out.startswith("registered date@1 (lora, digest ")
    shown = json.loads(ok("show", "date", "--json"))
    assert (shown["rank"], shown["alpha"], shown["targets"]) == (8, 16.0, ["q_proj", "v_proj"])
    assert shown["base"]["architecture"] == "LlamaForCausalLM" and shown["base"]["num_parameters"] > 100_000_000
    listed = json.loads(ok("list", "--compatible-with", smollm2_dir, "--where", "exact_match>=0.9", "--json"))
    assert [(v["ref"], v["match"]) for v in listed] == [("date@1", "exact")]

    ok("export", "date@1", tmp_path / "exported")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(smollm2(), tmp_path / "exported")
    assert_identical(get_peft_model_state_dict(loaded), saved)
