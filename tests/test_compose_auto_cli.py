"""``hub compose`` as a user meets it: bad input refused before any expensive work, one line, nothing written;
what a pruned sum lost to its stored rank said on the command line; a learned-weights recipe shared intact.
Tiny random Llamas (tests/test_rank.py)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hubserver import HubServer
from test_rank import generated, hub, tiny  # noqa: F401  (fixtures)

from cli.main import cli
from hub import compose
from hub.client import Hub
from hub.composition.auto import SearchConfig
from hub.data import write_jsonl
from hub.remote import Remote

pytestmark = pytest.mark.usefixtures("one_thread")

REFS = ["target", "other", "third"]


def stored_files(hub) -> list[str]:  # noqa: F811
    return sorted(str(p) for p in hub.store.root.rglob("*") if p.is_file() and p.suffix != ".lock")


def test_a_bad_name_is_refused_before_the_search_or_the_gate_fit(hub, tiny, tmp_path):  # noqa: F811
    data = write_jsonl(tiny["examples"], tmp_path / "few.jsonl")
    before = ([v.ref for v in hub.list()], stored_files(hub))
    common = [*REFS, "--fit-data", str(data), "--base", str(tiny["base_dir"]), "--quantize", "none"]
    for args in (["--auto", "--budget", "5"], ["--kind", "mixture", "--steps", "2"]):
        result = CliRunner().invoke(cli, ["compose", *common, *args, "--name", "bad name"])
        assert result.exit_code == 1 and result.output.startswith("error: invalid adapter name 'bad name'")
        # Neither the weight search ("weights ...") nor the gate's fit (its progress bar) ran first.
        assert result.output.count("\n") == 1, result.output
    assert ([v.ref for v in hub.list()], stored_files(hub)) == before


@pytest.mark.parametrize("lr", ["nan", "-1", "0", "inf"])
def test_a_gate_learning_rate_that_is_not_a_positive_number_is_a_usage_error(hub, tiny, tmp_path, lr):  # noqa: F811
    data = write_jsonl(tiny["examples"], tmp_path / "few.jsonl")
    result = CliRunner().invoke(cli, ["compose", *REFS, "--kind", "mixture", "--fit-data", str(data), "--base",
                                      str(tiny["base_dir"]), "--lr", lr, "--name", "mix"])
    assert result.exit_code == 2 and "Invalid value for '--lr'" in result.output and "internal" not in result.output
    assert [v.ref for v in hub.list()] == ["other@1", "target@1", "third@1"]


@pytest.mark.parametrize(("args", "message"), [
    # Without --kind mixture these made and registered a plain sum, the gate's options silently dropped.
    (["--routing", "sequence"], "--routing set a mixture's gate"),
    (["--kind", "stack", "--temperature", "0.5", "--steps", "9"], "--temperature, --steps set a mixture's gate"),
    (["--auto", "--fit-data", "few.jsonl", "--router", "two_pass"], "--router set a mixture's gate"),
    (["--top-k", "1"], "--top-k apply to a mixture's gate (--kind mixture) or the --auto search"),
    (["--kind", "mixture", "--fit-task", "date", "--majority-sign", "frequency"], "--majority-sign applies to a sum"),
])
def test_options_of_another_kind_are_usage_errors_not_ignored(hub_home, args, message):
    result = CliRunner().invoke(cli, ["compose", "a", "b", *args, "--name", "ab"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (hub_home / "store").exists() or not any((hub_home / "store").rglob("*.safetensors"))


def test_a_pruned_sum_says_what_its_stored_rank_lost(hub):  # noqa: F811
    runner = CliRunner()
    result = runner.invoke(cli, ["compose", "target", "other", "--strategy", "ties", "--density", "0.5",
                                 "--name", "tied"])
    assert result.exit_code == 0, result.output
    error = hub.get("tied@1").recipe["truncation_error"]
    assert error > 0 and f"rank 8, truncation error {error:.3g}" in result.stdout
    # At full rank (the modules are 32 wide) nothing is lost, and nothing is said.
    result = runner.invoke(cli, ["compose", "target", "other", "--strategy", "ties", "--density", "0.5",
                                 "--rank", "32", "--name", "tied"])
    assert result.exit_code == 0 and "truncation" not in result.stdout
    assert hub.get("tied@2").recipe["truncation_error"] == 0


def test_the_learned_weights_recipe_survives_push_and_pull(hub, tiny, tmp_path):  # noqa: F811
    merged = compose(REFS, "auto", examples=tiny["examples"][:3], base=tiny["nf4"], search=SearchConfig(budget=5),
                     hub=hub)
    source = merged.register(hub, name="few-shot").version
    with HubServer(tokens={"hf_t": "alice"}) as server:
        target = Hub(home=tmp_path / "teammate")
        for ref in (*(f"{name}@1" for name in REFS), source.ref):
            Remote(hub, endpoint=server.url, token="hf_t").push(ref, f"alice/{ref.split('@')[0]}")
            Remote(target, endpoint=server.url, token="hf_t").pull(f"alice/{ref.split('@')[0]}", "v1")
    pulled = target.get("few-shot@1")
    # The search (settings, weights, loss, each adapter alone...) and the weighted edges come back as recorded.
    assert pulled.recipe == source.recipe and pulled.recipe["search"]["weights"] == source.recipe["search"]["weights"]
    assert [(p.ref, p.weight, p.params) for p in pulled.parents] == [(p.ref, p.weight, p.params)
                                                                       for p in source.parents]
