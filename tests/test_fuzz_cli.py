"""Property-based fuzzing of the whole CLI (hypothesis): generated names, refs, aliases, tags, metrics, conditions,
numbers and remote references across commands, on SQLite and PostgreSQL.

For every generated command line: no traceback ever reaches the user (no unhandled exception, no internal error),
a failure is one ``error: ...`` line with exit code 1 (or click's usage error, exit 2), and a failing command
writes nothing: the registry's rows and the store's files are the same before and after.

HUB_FUZZ_EXAMPLES sets the number of generated command lines per database (default 300; the closing note's run
used 3000).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft_saved import save_folders
from sqlalchemy import MetaData, select

from cli.main import INTERNAL_ERROR, cli
from hub.client import Hub

EXAMPLES = int(os.environ.get("HUB_FUZZ_EXAMPLES", "300"))

# Inputs that broke the CLI once, or that sit on a boundary: they are drawn often beside random text.
SPECIAL = [
    "", " ", "date", "date\n", "date@", "@", "date@1", "date@2", "date@prod", "date@latest", "date@0", "date@-1",
    "date@²", "date@١", "date@99999999999999999999", "date@1.0", "date@ 1", "da te", "date-", "date--v2",
    "x" * 121, "x" * 1000, "v1", "v12", "main", "HEAD", "refs/tags/v1", "a/b", "../etc", "..", ".", "\x00",
    "date\x00", "\u202e", "é", "日本", "accuracy>=0.8", "accuracy>>0.8", "accuracy@date:test>=0.5",
    "accuracy>=nan", "accuracy>=inf", "accuracy>=1e999", "-accuracy", "accuracy=0.5", "acc@" + "d" * 300 + "=1",
    "k=1e999", "k=nan", "99999999999999999999", "-1", "0", "1", "org/name", "org/name@v1", "org/name/sub@v1",
    "org/a--b", "org/" + "n" * 100, "ORG/NAME@", "/abs", "org/name@../../x",
]
text = st.one_of(st.sampled_from(SPECIAL), st.text(max_size=24),
                 st.text(alphabet=st.characters(codec="ascii"), max_size=12))
COMMANDS = ["show", "list-where", "list-sort", "list-rank", "list-name", "list-tag", "alias", "unalias", "yank",
            "register", "export", "lineage", "pull", "push"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_folders(tmp_path_factory.mktemp("fuzz"))


def snapshot(hub: Hub, metadata: MetaData) -> tuple[Any, ...]:
    """Every row of every registry table (``metadata``: the tables, reflected once), and every file of the store
    with its size (lock files included)."""
    with hub.registry.engine.connect() as conn:
        rows = {name: sorted(map(repr, conn.execute(select(table)).all()))
                for name, table in metadata.tables.items() if name != "alembic_version"}
    root = hub.settings.store_dir
    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file()) \
        if root.exists() else []
    return rows, files


def command_line(kind: str, value: str, other: str, folders: dict[str, Path], out: Path) -> list[str]:
    return {
        "show": ["show", value],
        "list-where": ["list", "--where", value],
        "list-sort": ["list", "--sort", value],
        "list-rank": ["list", "--min-rank", value],
        "list-name": ["list", "--name", value, "--json"],
        "list-tag": ["list", "--tag", value],
        "alias": ["alias", value, other],
        "unalias": ["unalias", value],
        "yank": ["yank", value],
        "register": ["register", str(folders["lora8"]), "--name", value, "--base", str(folders["base"]),
                     "--tag", other, "--metric", f"acc={other}" if other[:1].isdigit() else other],
        "export": ["export", value, str(out)],
        "lineage": ["lineage", value],
        "pull": ["pull", value],
        "push": ["push", "date@1", "--repo", value],
    }[kind]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_no_generated_command_line_gives_a_traceback_or_writes_on_failure(
        database: str, folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HUB_HOME", str(home))
    if database == "postgresql":
        monkeypatch.setenv("HUB_DATABASE_URL", request.getfixturevalue("postgres_database"))
    else:
        monkeypatch.delenv("HUB_DATABASE_URL", raising=False)
    # A closed port: remote commands fail fast, and nothing can reach the internet.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_fuzz_secret_token")
    monkeypatch.setenv("HUB_REMOTE_NAMESPACE", "fuzz")
    hub = Hub()
    hub.register(folders["lora4"], name="date", base=folders["base"], metrics={"accuracy": 0.9})
    hub.register(folders["ia3"], name="date", base=folders["sibling"])
    hub.alias("date@1", "prod")
    # Reflected once: reflecting the schema for every snapshot took 95% of the run.
    metadata = MetaData()
    metadata.reflect(hub.registry.engine)
    runner = CliRunner()
    outcomes: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(kind=st.sampled_from(COMMANDS), value=text, other=text)
    def check(kind: str, value: str, other: str) -> None:
        out = tmp_path / "exported"
        before = snapshot(hub, metadata)
        result = runner.invoke(cli, command_line(kind, value, other, folders, out))
        outcomes[result.exit_code] = outcomes.get(result.exit_code, 0) + 1
        where = f"{kind} {value!r} {other!r}: {result.output!r}"
        assert result.exception is None or isinstance(result.exception, SystemExit), where
        assert result.exit_code in (0, 1, 2), where
        assert result.exit_code != INTERNAL_ERROR and "Traceback" not in result.output, where
        assert "hf_fuzz_secret_token" not in result.output, where
        if result.exit_code == 1:
            # One line for the error; the hub's own warnings and notes may come before it.
            lines = [line for line in result.stderr.splitlines() if not line.startswith(("warning:", "note:"))]
            assert len(lines) == 1 and lines[0].startswith("error: "), where
        if result.exit_code != 0:
            assert snapshot(hub, metadata) == before, where
            assert not out.exists(), where
        elif out.exists():
            shutil.rmtree(out)

    check()
    print(f"\n{database}: {sum(outcomes.values())} command lines, exit codes {dict(sorted(outcomes.items()))}")
    # A harness in which every command fails would prove nothing: the valid inputs among the generated ones pass.
    assert outcomes.get(0, 0) > 0 and run_ok(runner, ["show", "date@1"]), outcomes


def run_ok(runner: CliRunner, args: list[str]) -> bool:
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    return True
