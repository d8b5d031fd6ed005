"""The built-in task suite on SmolLM2-135M-Instruct (nf4): base exact match, then one adapter per task trained with
a recipe (default: ``hub.train.Recipe()``, what the test fixture ``task_experts`` trains), its exact match and the
training wall time. Also: every expert on every task's prompts, to show the tasks are told apart by their prompts.

    OMP_NUM_THREADS=1 .venv/bin/python -u bench/bench_train_tasks.py [--test 50] [--threads 1] [--tasks date,name]
        [--recipe '{"method": "ia3", "steps": 20}'] [--cross]

``--methods``: instead, the default recipe of each trainable method (``hub train NAME --method M --task date``:
its ``default_steps``, ``default_lr``, ``default_warmup``) on one task, one table; ``--sweep`` then tries a grid
of steps × learning rates (multiples of the default) × warm-ups for each method below ``--target`` exact match:

    OMP_NUM_THREADS=1 .venv/bin/python -u bench/bench_train_tasks.py --methods all [--task date] [--sweep]
        [--grid-steps 12,24,48] [--grid-lr 0.3,1,3] [--grid-warmup 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.evaluate import evaluate  # noqa: E402
from hub.methods.table import trainable_names  # noqa: E402
from hub.runtime import attach, load_base  # noqa: E402
from hub.runtime.pretrained import smollm2_path  # noqa: E402
from hub.tasks import TASKS, examples  # noqa: E402
from hub.train import Recipe, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=int, default=50, help="test examples per task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipe", default="{}", help="Recipe fields as JSON, over the defaults")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated built-in tasks")
    parser.add_argument("--cross", action="store_true", help="also score every expert on every task")
    parser.add_argument("--no-base", action="store_true", help="skip scoring the base (it scores 0 on every task)")
    parser.add_argument("--methods", help="'all' or comma-separated recipe names: score each method's default "
                        "recipe on --task instead")
    parser.add_argument("--task", default="date", help="the task of --methods")
    parser.add_argument("--sweep", action="store_true", help="with --methods: try the grid for each method below "
                        "--target")
    parser.add_argument("--target", type=float, default=0.9, help="the exact match a default recipe must reach")
    parser.add_argument("--grid-steps", default="12,24,48")
    parser.add_argument("--grid-lr", default="0.3,1,3", help="multiples of the method's default learning rate")
    parser.add_argument("--grid-warmup", default="", help="warm-up steps to try (default: the method's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Checked before the model loads.
    recipe = Recipe.from_dict(json.loads(args.recipe))
    names = None if args.methods is None else trainable_names() if args.methods == "all" else args.methods.split(",")
    defaults = [Recipe(method=name) for name in names or ()]
    started = time.perf_counter()
    base = load_base(smollm2_path(cache_dir=ROOT / ".cache"), quantize="nf4")
    print(f"nf4 base loaded in {time.perf_counter() - started:.0f}s")
    model, tokenizer = base.model, base.tokenizer
    if names is not None:
        compare_methods(model, tokenizer, defaults, args)
        return
    print(f"recipe {json.dumps(recipe.to_dict())}")
    tasks = args.tasks.split(",")
    tests = {name: examples(name, "test", args.test) for name in tasks}
    experts = {}
    print(f"{'task':<8} {'base EM':>8} {'trained EM':>11} {'train s':>8} {'final loss':>11}")
    for name in tasks:
        base_em = float("nan") if args.no_base else evaluate(
            model, tokenizer, tests[name], batch_size=args.test, progress=False).exact_match
        result = train(model, tokenizer, examples(name, "train", 1000), recipe, progress=False)
        experts[name] = result.adapter
        handle = attach(model, result.adapter, name=name)
        trained_em = evaluate(model, tokenizer, tests[name], batch_size=args.test, progress=False).exact_match
        handle.detach()
        print(f"{name:<8} {base_em:>8.2f} {trained_em:>11.2f} {result.seconds:>8.1f} {result.losses[-1]:>11.4f}")
    if args.cross:
        print("exact match of each expert (rows) on each task (columns)")
        print(f"{'':<8} " + " ".join(f"{name:>8}" for name in tasks))
        for expert, adapter in experts.items():
            handle = attach(model, adapter, name=expert)
            scores = [evaluate(model, tokenizer, tests[name], batch_size=args.test, progress=False).exact_match
                      for name in tasks]
            handle.detach()
            print(f"{expert:<8} " + " ".join(f"{score:>8.2f}" for score in scores))


def compare_methods(model: torch.nn.Module, tokenizer: Any, defaults: list[Recipe], args: argparse.Namespace) -> None:
    """One table row per default recipe on ``args.task``; with ``--sweep``, the grid for each one below target."""
    train_set = examples(args.task, "train", 1000)  # what ``hub train --task`` trains on (Hub.train's count)
    test_set = examples(args.task, "test", args.test)

    def row(recipe: Recipe, label: str) -> float:
        result = train(model, tokenizer, train_set, recipe, progress=False)
        handle = attach(model, result.adapter, name=recipe.method)
        try:
            score = evaluate(model, tokenizer, test_set, batch_size=args.test, progress=False).exact_match
        finally:
            handle.detach()
        params = sum(tensor.numel() for tensor in result.adapter.tensors.values())
        print(f"| {label:<8} | {recipe.method:<14} | {recipe.steps:>5} | {recipe.lr:>7.3g} | {recipe.warmup:>6} "
              f"| {params:>10,} | {result.seconds:>7.1f} | {result.losses[-1]:>10.4f} | {score:>5.2f} |", flush=True)
        return score

    print(f"{args.task}: exact match on {len(test_set)} test examples after training on {len(train_set)}")
    print(f"| {'recipe':<8} | {'method':<14} | {'steps':>5} | {'lr':>7} | {'warmup':>6} | {'params':>10} "
          f"| {'train s':>7} | {'final loss':>10} | {'EM':>5} |")
    print(f"|{'-' * 10}|{'-' * 16}|{'-' * 6}:|{'-' * 8}:|{'-' * 7}:|{'-' * 11}:|{'-' * 8}:|{'-' * 11}:|{'-' * 6}:|")
    for recipe in defaults:
        if row(recipe, "default") >= args.target or not args.sweep:
            continue
        warmups = [int(w) for w in args.grid_warmup.split(",") if w] or [recipe.warmup]
        for steps in (int(s) for s in args.grid_steps.split(",")):
            for factor in (float(f) for f in args.grid_lr.split(",")):
                for warmup in warmups:
                    candidate = Recipe(method=recipe.method, steps=steps, lr=recipe.lr * factor, warmup=warmup)
                    if candidate != recipe:
                        row(candidate, "sweep")


if __name__ == "__main__":
    main()
