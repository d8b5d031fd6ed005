"""Acceptance: a gated mixture of task experts on the real SmolLM2-135M-Instruct, nf4.

Three LoRA experts, each trained on one built-in task (``task_experts``), are combined four ways and scored by exact
match on a mixed test set: each expert alone, weighted sums (exact, svd, ties), the mixture (its gate fitted on a
mixed train set, base and experts frozen), and the oracle (each task answered by its own expert). The mixture
must reach 90% of the oracle, weight each expert most on its own task's tokens, and survive save and reload.
"""

from __future__ import annotations

import pytest
import torch

from hub import compose, tasks
from hub.client import Hub
from hub.composition import RouterConfig, activate
from hub.evaluate import evaluate
from hub.runtime import attach

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TEST_PER_TASK = 10
TRAIN_PER_TASK = 300  # distinct examples, each seen about once: a small set repeated, the gate overfits it
FIT_STEPS = 40


@pytest.fixture(scope="module")
def nf4(smollm2_nf4):
    return smollm2_nf4


@pytest.fixture(scope="module")
def test_sets() -> dict[str, list]:
    return {name: tasks.examples(name, "test", TEST_PER_TASK) for name in tasks.TASKS}


def exact_match(nf4, test_sets, handle) -> dict[str, float]:
    """Exact match per task and on the mixed set (the mean: the tasks have equally many examples)."""
    try:
        scores = {name: evaluate(nf4.model, nf4.tokenizer, examples, progress=False).exact_match
                  for name, examples in test_sets.items()}
    finally:
        handle.detach()
    return {**scores, "mixed": sum(scores.values()) / len(scores)}


def test_mixture_routes_tasks_to_their_experts_near_the_oracle_on_nf4(nf4, task_experts, test_sets, tmp_path):
    names = list(tasks.TASKS)
    experts = [task_experts[name] for name in names]
    rows: dict[str, dict[str, float]] = {}
    for name, expert in zip(names, experts, strict=True):
        rows[f"{name} expert"] = exact_match(nf4, test_sets, attach(nf4.model, expert, name=name))
    rows["oracle"] = {name: rows[f"{name} expert"][name] for name in names}
    rows["oracle"]["mixed"] = sum(rows["oracle"].values()) / len(names)
    for label, options in (("sum exact", {}), ("sum svd r8", {"strategy": "svd", "rank": 8}),
                           ("sum ties d0.5", {"strategy": "ties", "density": 0.5})):
        merged = compose(experts, [1 / len(experts)] * len(experts), **options)
        rows[label] = exact_match(nf4, test_sets, merged.attach(nf4.model))

    mixture = compose(experts, kind="mixture", router=RouterConfig())
    train = [example for _, example in tasks.mixed("train", TRAIN_PER_TASK)]
    fit = mixture.fit(nf4.model, nf4.tokenizer, train, steps=FIT_STEPS, progress=False)
    assert fit.losses[-1] < fit.losses[0]

    # Routing: each expert carries more of the gate weight on its own task's prompts and answers than on any other
    # task's, and more than an equal share. (Not the largest share at every layer: where two experts' updates do
    # the same job, the fitted gate may pick either, e.g. the record expert at some layers of name inputs.)
    handle = mixture.attach(nf4.model)
    try:
        shares = []  # [task, expert]: the expert weights averaged over the task's tokens and the routed layers
        for name in names:
            per_text = []
            for example in test_sets[name][:4]:
                ids = nf4.tokenizer(example.prompt + example.completion, return_tensors="pt")["input_ids"]
                with torch.no_grad():
                    nf4.model(ids)
                per_text.append(torch.stack([gates[0].mean(0) for gates in handle.last_gates.values()]).mean(0))
            shares.append(torch.stack(per_text).mean(0))
        shares = torch.stack(shares)
    finally:
        handle.detach()
    for index, name in enumerate(names):
        assert shares[:, index].argmax().item() == index and shares[index, index] > 1 / len(names), (
            name, shares.tolist())
    rows["mixture"] = exact_match(nf4, test_sets, mixture.attach(nf4.model))

    # Saved and reloaded through the registry: every gate tensor, the same answers.
    hub = Hub(home=tmp_path / "hub")
    version = mixture.register(hub, name="tasks-mixture", base=nf4.fingerprint).version
    assert set(hub.load(version.ref).tensors) == set(mixture.to_adapter().tensors)
    rows["mixture reloaded"] = exact_match(nf4, test_sets, activate(nf4.model, version.ref, hub=hub))

    print(f"\nexact match on nf4 SmolLM2-135M, {TEST_PER_TASK} test examples per task "
          f"(gate fitted on {len(train)} examples, {FIT_STEPS} steps; loss {fit.losses[0]:.2f} → {fit.losses[-1]:.2f})")
    print(f"{'':18s}" + "".join(f"{column:>9s}" for column in [*names, "mixed"]))
    for label, row in rows.items():
        print(f"{label:18s}" + "".join(f"{row[column]:9.2f}" for column in [*names, "mixed"]))
    print("gate weight per expert (columns) on each task's tokens (rows): "
          + "; ".join(f"{name} {[round(x, 2) for x in row]}" for name, row in zip(names, shares.tolist(), strict=True)))
    assert rows["mixture reloaded"] == rows["mixture"]
    assert rows["mixture"]["mixed"] >= 0.9 * rows["oracle"]["mixed"], rows
