"""registry.db.example: the registry the demo leaves behind, shipped so users can explore a populated registry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from hub.fingerprint import fingerprint
from hub.registry import Registry, current_revision, head_revision

EXAMPLE = Path(__file__).resolve().parent.parent / "registry.db.example"


@pytest.fixture
def example_url(tmp_path: Path) -> str:
    copy = tmp_path / "registry.db"
    shutil.copyfile(EXAMPLE, copy)  # never touch the shipped file
    return f"sqlite:///{copy}"


def test_example_is_at_the_migration_head_and_lists(example_url: str) -> None:
    # A schema change without regenerating the example (scripts/make_registry_example.sh) fails here.
    assert current_revision(example_url) == head_revision()
    with Registry(example_url) as registry:
        versions = {v.name: v for v in registry.list()}
        assert {"date", "name", "record", "sum-exact", "sum-svd8", "mixture"} <= set(versions)
        for task in ("date", "name", "record"):
            trained = versions[task]
            assert trained.method == "lora" and trained.recipe and trained.recipe["method"] == "lora"
            # each expert is far better on its own task than on the others
            own = trained.metric("exact_match", dataset=task)
            others = [trained.metric("exact_match", dataset=t) for t in ("date", "name", "record") if t != task]
            assert own is not None and own > max(others) + 0.5
        assert [p.name for p in versions["sum-exact"].parents] == ["date", "name", "record"]
        assert {p.strategy for p in versions["sum-svd8"].parents} == {"svd"}
        assert versions["sum-svd8"].rank == 8


def test_cli_lists_the_example(example_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HUB_DATABASE_URL", example_url)
    result = CliRunner().invoke(cli, ["list", "--where", "exact_match>=0.5", "--sort", "exact_match"])
    assert result.exit_code == 0, result.output
    assert "date@1" in result.output and "mixture@1" in result.output


@pytest.mark.slow
def test_example_adapters_are_exact_matches_for_smollm2(example_url: str, smollm2_dir: Path) -> None:
    with Registry(example_url) as registry:
        matches = registry.compatible(fingerprint(smollm2_dir))
    assert {m.version.name for m in matches} >= {"date", "name", "record", "sum-exact"}
    assert all(m.exact for m in matches)
