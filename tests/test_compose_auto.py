"""Learned composition weights (``compose(weights="auto")``, ``hub compose --auto``) on tiny random Llamas, nf4.

The examples are what the base with the ``target`` LoRA at weight 1 generates (tests/test_rank.py), so a search
that works finds weights that fit them better than any fixed uniform merge, with ``target`` weighted most.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from peft import IA3Config
from test_rank import PROMPTS, generated, hub, save_adapter, tiny  # noqa: F401  (fixtures)

from cli.main import cli
from hub import compose
from hub.composition.auto import MATCH_LOSS_SHARE, SearchConfig, examples_digest, search_weights
from hub.composition.members import resolve
from hub.data import encode, write_jsonl
from hub.errors import Incompatible
from hub.evaluate import evaluate
from hub.formats import read_adapter
from hub.runtime import load_base

pytestmark = pytest.mark.usefixtures("one_thread")

REFS = ["target", "other", "third"]


def loss_of(merged, base, examples) -> float:
    handle = merged.attach(base.model)
    try:
        return evaluate(base.model, base.tokenizer, examples, generate=False, progress=False).loss
    finally:
        handle.detach()


@pytest.mark.parametrize("method", ["cma", "gradient"])
def test_auto_weights_recover_the_adapter_behind_the_examples(hub, tiny, method):  # noqa: F811
    base, examples = tiny["nf4"], tiny["examples"]
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    budget = 40 if method == "cma" else 15
    merged = compose(REFS, "auto", examples=examples, base=base, search=SearchConfig(method=method, budget=budget),
                     hub=hub)
    weights = [m.weight for m in merged.members]
    assert weights[0] == max(weights), weights
    uniform = compose(REFS, [1 / 3] * 3, hub=hub)
    assert loss_of(merged, base, examples) < loss_of(uniform, base, examples)
    # The search's loss is the loss of the exact sum it returns: gates on the stack = the merged adapter.
    assert merged.search.loss == pytest.approx(loss_of(merged, base, examples), rel=1e-3)
    assert all(-1.5 <= w <= 1.5 for w in weights)
    assert merged.search.evaluations == budget and len(merged.search.history) == budget
    state = base.model.state_dict()  # the base was only read, and nothing stays attached
    assert all(torch.equal(state[k], before[k]) for k in before) and not base.model.__dict__.get("hub_adapters")


def test_auto_weights_on_an_int8_base(hub, tiny):  # noqa: F811
    int8 = load_base(tiny["base_dir"], quantize="int8")
    merged = compose(REFS, "auto", examples=tiny["examples"], base=int8, search=SearchConfig("gradient", budget=12),
                     hub=hub)
    weights = [m.weight for m in merged.members]
    assert weights[0] == max(weights), weights


def test_the_search_is_reproducible_from_its_seed(hub, tiny):  # noqa: F811
    members = resolve(REFS, None, hub=hub)
    runs = [search_weights(tiny["nf4"].model, tiny["nf4"].tokenizer, members, tiny["examples"][:3],
                           SearchConfig(budget=8, seed=3)) for _ in range(2)]
    assert runs[0].weights == runs[1].weights and runs[0].history == runs[1].history


def test_the_search_starts_from_retrieval_and_ends_no_worse_than_the_best_adapter_alone(hub, tiny):  # noqa: F811
    base, examples = tiny["nf4"], tiny["examples"]
    ranked = {r.ref: r.loss for r in hub.rank(examples, base=base, candidates=REFS, generate=False)}
    alone = [ranked[f"{ref}@1"] for ref in REFS]
    merged = compose(REFS, "auto", examples=examples, base=base, search=SearchConfig(budget=6, top_k=2), hub=hub)
    search = merged.search
    # Retrieval first: each adapter alone scores as hub.rank scores it, and only the best two are searched.
    assert search.alone == pytest.approx(alone, rel=1e-4)
    assert search.searched == sorted(sorted(range(3), key=alone.__getitem__)[:2])
    assert all(w == 0 for i, w in enumerate(search.weights) if i not in search.searched)
    # The best point evaluated wins, and the best adapter alone was one of them.
    assert search.objective <= min(alone) + 0.05 / 3 + 1e-6 and search.objective == pytest.approx(min(search.history))
    recipe = merged.register(hub, name="retrieved").version.recipe["search"]
    assert recipe["start"] == "rank" and recipe["top_k"] == 2 and recipe["searched"] == search.searched
    # LoraHub's search stays one setting away: from 0, every weight searched, no retrieval.
    lorahub = compose(REFS, "auto", examples=examples, base=base, hub=hub,
                      search=SearchConfig(budget=6, start="zero", top_k=None)).search
    assert lorahub.alone == [] and lorahub.searched == [0, 1, 2] and lorahub.evaluations == 6


def test_retrieval_searches_the_adapter_best_on_most_examples_not_the_lowest_mean_loss(hub, tiny):  # noqa: F811
    # A mixed set: four short answers of "target", two long ones of "other". The mean loss per token is dominated
    # by the long answers, so it ranks "other" first; "target" is the best adapter on most examples.
    base = tiny["nf4"]
    short = generated(base, read_adapter(tiny["loras"]["target"]), PROMPTS[:4], new_tokens=2)
    long = generated(base, read_adapter(tiny["loras"]["other"]), PROMPTS[4:], new_tokens=24)
    mixed = short + long
    search = compose(REFS, "auto", examples=mixed, base=base, hub=hub,
                     search=SearchConfig(budget=6, top_k=1)).search
    per_example = [{r.ref: r.loss for r in hub.rank([ex], base=base, candidates=REFS, generate=False)}
                   for ex in mixed]
    best = [REFS.index(min(losses, key=losses.get).removesuffix("@1")) for losses in per_example]
    assert search.wins == [best.count(i) for i in range(3)]
    assert search.alone.index(min(search.alone)) != search.wins.index(max(search.wins))  # the case this is about
    assert search.searched == [search.wins.index(max(search.wins))]


def completion_log_probs(base, examples) -> list[float]:
    """log P(completion | prompt) of each example under ``base``'s model as it stands: the summed log-probabilities
    of the completion's tokens (and EOS), computed here one example at a time."""
    values = []
    for example in examples:
        encoded = encode(base.tokenizer, example, max_length=128)
        with torch.no_grad():
            logits = base.model(input_ids=torch.tensor([encoded.input_ids])).logits[0, :-1].float()
        targets = torch.tensor(encoded.labels[1:])
        values.append(-float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")))
    return values


@pytest.mark.parametrize("objective", ["match_probability", "loss"])
def test_the_objective_is_what_the_weighted_sum_scores_on_the_examples(hub, tiny, objective):  # noqa: F811
    base, examples = tiny["nf4"], tiny["examples"]
    settings = SearchConfig(budget=8, top_k=2, objective=objective)
    search = compose(REFS, "auto", examples=examples, base=base, hub=hub, search=settings).search
    handle = compose(REFS, search.weights, hub=hub).attach(base.model)
    try:
        log_probs = completion_log_probs(base, examples)
    finally:
        handle.detach()
    penalty = settings.l1 * sum(abs(w) for w in search.weights) / len(REFS)
    tokens = sum(sum(label != -100 for label in encode(base.tokenizer, ex, max_length=128).labels) for ex in examples)
    assert search.loss == pytest.approx(-sum(log_probs) / tokens, rel=1e-3)
    # match_probability: 1 - the mean probability of each whole completion (the exact match expected by sampling).
    expected = search.loss if objective == "loss" else \
        1 - sum(math.exp(lp) for lp in log_probs) / len(log_probs) + MATCH_LOSS_SHARE * search.loss
    assert search.objective == pytest.approx(expected + penalty, rel=1e-3, abs=1e-5)
    assert search.objective == pytest.approx(min(search.history), rel=1e-4)  # the best point evaluated is kept


def test_registered_recipe_and_lineage_record_the_search(hub, tiny):  # noqa: F811
    merged = compose(REFS, "auto", examples=tiny["examples"], base=tiny["nf4"], search=SearchConfig(budget=12, l1=0.1),
                     strategy="svd", rank=4, hub=hub)
    version = merged.register(hub, name="few-shot").version
    search = version.recipe["search"]
    assert search["method"] == "cma" and search["budget"] == 12 and search["bounds"] == [-1.5, 1.5]
    assert search["l1"] == 0.1 and search["seed"] == 0 and search["examples"] == len(tiny["examples"])
    assert search["examples_sha256"] == examples_digest(tiny["examples"]) != examples_digest(tiny["examples"][1:])
    assert search["weights"] == pytest.approx([m.weight for m in merged.members], abs=1e-6)
    assert search["loss"] > 0 and version.recipe["strategy"] == "svd"
    assert [round(p.weight, 6) for p in version.parents] == pytest.approx(search["weights"], abs=1e-6)
    assert all(p.params["search"]["method"] == "cma" for p in version.parents)


def test_cli_compose_auto_registers_and_bad_inputs_exit_with_one_line(hub, tiny, tmp_path):  # noqa: F811
    data = write_jsonl(tiny["examples"], tmp_path / "few.jsonl")
    runner = CliRunner()
    common = ["compose", *REFS, "--auto", "--base", str(tiny["base_dir"]), "--quantize", "nf4"]
    result = runner.invoke(cli, [*common, "--fit-data", str(data), "--budget", "10", "--top-k", "2", "--objective",
                                 "loss", "--name", "auto", "--json"])
    assert result.exit_code == 0, result.output
    version = json.loads(result.stdout)
    search = version["recipe"]["search"]
    assert search["budget"] == 10 and len(version["parents"]) == 3
    assert search["start"] == "rank" and search["top_k"] == 2 and len(search["searched"]) == 2
    assert search["objective"] == "loss" and search["objective"] != SearchConfig().objective
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for args, message in ((["--fit-data", str(empty)], "holds no examples"),
                          (["--fit-data", str(data), "--bounds", "1,-1"], "low < high")):
        result = runner.invoke(cli, [*common, *args, "--name", "x"])
        assert result.exit_code == 1 and result.output.startswith("error: ") and message in result.output
        assert result.output.count("\n") == 1
    result = runner.invoke(cli, [*common, "--name", "x"])
    assert result.exit_code == 2 and "pass --fit-data" in result.output
    result = runner.invoke(cli, ["compose", *REFS, "--budget", "10", "--l1", "0", "--name", "x"])
    assert result.exit_code == 2 and "--budget, --l1 set the --auto search: use them with --auto" in result.output


@pytest.mark.parametrize(("options", "message"), [
    ({}, "needs examples"),
    ({"kind": "stack", "examples": "x"}, "fits a weighted sum"),
    ({"search": "anneal", "examples": "x"}, "unknown weight search"),
    ({"search": SearchConfig(budget=3), "examples": "x"}, "give a budget above 3"),
    ({"search": {"budget": 5, "steps": 3}, "examples": "x"}, "unknown search setting steps"),
    ({"search": {"bounds": (0.5, 1.0)}, "examples": "x"}, r"low <= 0 <= high"),
    ({"search": {"bounds": (0, 1, 2)}, "examples": "x"}, r"two numbers \(low, high\)"),
    ({"search": ["cma"], "examples": "x"}, "not a list"),
])
def test_bad_auto_inputs_are_refused_with_one_line(hub, tiny, options, message):  # noqa: F811
    options = {k: tiny["examples"] if v == "x" else v for k, v in options.items()}
    with pytest.raises(Incompatible, match=message) as caught:
        compose(REFS, "auto", base=tiny["nf4"], hub=hub, **options)
    assert "\n" not in str(caught.value)
    with pytest.raises(Incompatible, match="unknown objective 'em' \\(known: loss, match_probability\\)"):
        SearchConfig(objective="em")
    with pytest.raises(Incompatible, match="apply to fitting the weights"):
        compose(REFS, [1, 1, 1], examples=tiny["examples"], hub=hub)


def test_only_distinct_lora_family_adapters_are_searched(hub, tiny, tmp_path):  # noqa: F811
    # A gate on IA3's scaling vectors or on virtual tokens is not the weighted sum the merge then makes: the recipe's
    # score would not be the registered adapter's. The same adapter twice makes a degenerate search.
    config = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                       init_ia3_weights=False)
    for seed, name in enumerate(("scales", "more-scales")):
        hub.register(save_adapter(tiny["base_dir"], tmp_path / name, config, seed=seed), name=name,
                     base=tiny["base_dir"])
    for refs, message in ((["scales", "more-scales"], r"scales@1 \(ia3\): weights='auto' searches sums of "
                                                      "additive adapters"),
                          (["target", "other", "target@1"], "target@1 appears twice in the weight search")):
        with pytest.raises(Incompatible, match=message):
            compose(refs, "auto", examples=tiny["examples"], base=tiny["nf4"], hub=hub)


def test_cli_mixture_takes_its_routing(hub, tiny, tmp_path):  # noqa: F811
    data = write_jsonl(tiny["examples"], tmp_path / "few.jsonl")
    args = ["compose", *REFS, "--kind", "mixture", "--fit-data", str(data), "--steps", "2", "--base",
            str(tiny["base_dir"]), "--quantize", "nf4", "--json"]
    result = CliRunner().invoke(cli, [*args, "--routing", "sequence", "--name", "routed"])
    assert result.exit_code == 0, result.output
    assert hub.load("routed@1").config["router"]["routing"] == "sequence"
    result = CliRunner().invoke(cli, [*args, "--routing", "per-word", "--name", "routed"])
    assert result.exit_code == 2 and "per-word" in result.output
