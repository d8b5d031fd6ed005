"""Full-text search (hub.registry.search, migration 0005): what it finds, in what order, the same on SQLite and
PostgreSQL, kept in step with every write by the database's triggers, and rebuilt by an upgrade."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from alembic import command
from click.testing import CliRunner

from cli.main import cli
from hub.errors import QueryError
from hub.fingerprint import Fingerprint
from hub.formats import AdapterSpec
from hub.registry import Metric, Registry
from hub.registry.database import alembic_config
from hub.registry.search import MAX_TEXT, search, words

BASE = Fingerprint("a" * 64, "s" * 64, "LlamaForCausalLM", 1_000)
OTHER = Fingerprint("b" * 64, "t" * 64, "LlamaForCausalLM", 1_000)


def add(registry: Registry, name: str, content: str, *, method: str = "lora", targets=("q_proj", "v_proj"),
        base: Fingerprint = BASE, **options):
    spec = AdapterSpec(method, 8, 16.0, tuple(targets), "base")
    return registry.register(name, digest=hashlib.sha256(content.encode()).hexdigest(), spec=spec,
                             config={"peft_type": method.upper(), "r": 8}, size_bytes=10, base=base,
                             base_name="models/base", **options)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_database")


def populate(registry: Registry) -> None:
    add(registry, "math-lora", "1", description="Solves grade-school arithmetic word problems", tags=["math"],
        metrics=[Metric("accuracy", 0.61, "gsm8k", "test")])
    add(registry, "math-lora", "2", metrics=[Metric("accuracy", 0.68, "gsm8k", "test")])
    add(registry, "lora", "3", description="A plain LoRA for Math, café style", tags=["café"])
    add(registry, "code-helper", "4", description="Writes Python", tags=["math-free"], method="loha",
        targets=("down_proj",), base=OTHER)
    add(registry, "summarizer", "5", description="Summaries of long documents", tags=["news"],
        metrics=[Metric("rouge_l", 0.3, "cnn_dailymail")])


def found(registry: Registry, text: str, **options) -> list[tuple[str, str]]:
    return [(hit.version.ref, hit.match) for hit in search(registry, text, **options)]


# The expected results of each search, the same on every backend: exact name, then names, then the rest, each
# newest first.
EXPECTED = {
    "math-lora": [("math-lora@2", "exact name"), ("math-lora@1", "exact name"), ("lora@1", "text")],
    # summarizer is a LoRA (its card says so); code-helper, a LoHa tagged math-free, holds "math" but not "lora"
    "lora": [("lora@1", "exact name"), ("math-lora@2", "name"), ("math-lora@1", "name"), ("summarizer@1", "text")],
    "MATH": [("math-lora@2", "name"), ("math-lora@1", "name"), ("code-helper@1", "text"), ("lora@1", "text")],
    "arithm": [("math-lora@2", "text"), ("math-lora@1", "text")],  # the adapter's description, as a prefix
    "gsm8k": [("math-lora@2", "text"), ("math-lora@1", "text")],  # a metric's dataset
    "rouge": [("summarizer@1", "text")],  # a metric's name
    "down_proj": [("code-helper@1", "text")],  # card text: the targets
    "loha": [("code-helper@1", "text")],  # card text: the method
    "café": [("lora@1", "text")],
    "news documents": [("summarizer@1", "text")],  # every word must match
    "news python": [],
}


@pytest.mark.parametrize("text", list(EXPECTED))
def test_search_finds_and_ranks_the_same_on_every_backend(db_url: str, text: str) -> None:
    with Registry(db_url) as registry:
        populate(registry)
        assert found(registry, text) == EXPECTED[text]


def test_filters_as_in_list(db_url: str) -> None:
    with Registry(db_url) as registry:
        populate(registry)
        assert found(registry, "math", method="loha") == [("code-helper@1", "text")]
        assert found(registry, "math", where=["accuracy@gsm8k>=0.65"]) == [("math-lora@2", "name")]
        assert found(registry, "math", tags=["café"]) == [("lora@1", "text")]
        assert found(registry, "math", weights_hash=OTHER.weights_hash) == [("code-helper@1", "text")]
        registry.yank("math-lora@2")
        assert [ref for ref, _ in found(registry, "arithmetic gsm8k")] == ["math-lora@1"]
        assert [ref for ref, _ in found(registry, "gsm8k", include_yanked=True)] == ["math-lora@2", "math-lora@1"]


def test_pages_join_up_to_the_whole_result(db_url: str) -> None:
    with Registry(db_url) as registry:
        populate(registry)
        for limit in (1, 2, 3):
            refs, page = [], search(registry, "math", limit=limit)
            refs += [hit.version.ref for hit in page]
            while page.next_after:
                page = search(registry, "math", limit=limit, after=page.next_after)
                refs += [hit.version.ref for hit in page]
            assert refs == [ref for ref, _ in EXPECTED["MATH"]]
        with pytest.raises(QueryError, match="another search"):
            search(registry, "lora", after=search(registry, "math", limit=1).next_after)


def test_the_index_follows_every_write(db_url: str) -> None:
    with Registry(db_url) as registry:
        populate(registry)
        add(registry, "code-helper", "6", description="Writes Rust now")  # the adapter's description changes
        assert found(registry, "rust") == [("code-helper@2", "text"), ("code-helper@1", "text")]
        assert found(registry, "python") == []
        registry.add_metrics("summarizer@1", [Metric("bleu", 3.0)])
        add(registry, "summarizer", "5", tags=["fresh"])  # the same digest: a tag added to the version
        assert found(registry, "bleu fresh") == [("summarizer@1", "text")]
        registry.delete("code-helper@2")
        assert found(registry, "rust") == [("code-helper@1", "text")]
        registry.delete("summarizer@1")
        assert found(registry, "bleu") == []


def test_an_upgrade_builds_the_index_of_a_populated_registry(db_url: str) -> None:
    with Registry(db_url) as registry:
        populate(registry)
    command.downgrade(alembic_config(db_url), "0004")  # as a registry made before search existed
    command.upgrade(alembic_config(db_url), "head")
    with Registry(db_url) as registry:
        for text, expected in EXPECTED.items():
            assert found(registry, text) == expected, text


@pytest.mark.parametrize(("text", "message"), [
    ("", "no words"), ("  ", "no words"), ("!!! ??? ---", "no words"),
    ("x" * (MAX_TEXT + 1), f"at most {MAX_TEXT}"),
    (" ".join(f"w{i}" for i in range(20)), "at most 16"),
    (None, "must be a string"),
])
def test_malformed_search_text_is_refused(tmp_path: Path, text, message: str) -> None:
    with Registry(f"sqlite:///{tmp_path / 'r.db'}") as registry, pytest.raises(QueryError, match=message):
        search(registry, text)


def test_query_syntax_is_never_passed_through(db_url: str) -> None:
    """FTS5 and tsquery operators in the text are plain separators: no syntax errors, no injection."""
    with Registry(db_url) as registry:
        populate(registry)
        for text in ('math" OR "x', "math NOT lora", "math:* | !lora", "name:math", "(math", "math'--", "m*"):
            assert isinstance(found(registry, text), list), text
        assert found(registry, 'arithm" OR "zzz') == []  # "or" and "zzz" are words that must match too


def test_words() -> None:
    assert words("Math-LoRA v2.1 q_proj café ÉTÉ") == ["math", "lora", "v2", "1", "q", "proj", "café", "ÉtÉ"]


def test_cli_search(hub_home: Path) -> None:
    from hub.client import Hub

    populate(Hub().registry)
    runner = CliRunner()
    result = runner.invoke(cli, ["search", "math-lora", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [(r["ref"], r["match"]) for r in data["results"]] == EXPECTED["math-lora"] and data["next_after"] is None
    table = runner.invoke(cli, ["search", "math", "--limit", "1"])
    assert table.exit_code == 0 and "math-lora@2" in table.output and "--after" in table.output
    bad = runner.invoke(cli, ["search", "x" * 600])
    assert bad.exit_code == 1 and bad.output.startswith("error: search text is 600 characters long")
