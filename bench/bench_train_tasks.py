"""The built-in task suite on SmolLM2-135M-Instruct (nf4): base exact match, then one adapter per task trained with
a recipe (default: ``hub.train.Recipe()``, what the test fixture ``task_experts`` trains), its exact match and the
training wall time. Also: every expert on every task's prompts, to show the tasks are told apart by their prompts.

    OMP_NUM_THREADS=1 .venv/bin/python -u bench/bench_train_tasks.py [--test 50] [--threads 1] [--tasks date,name]
        [--recipe '{"method": "ia3", "steps": 20}'] [--cross]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.evaluate import evaluate  # noqa: E402
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Recipe.from_dict({**Recipe().to_dict(), **json.loads(args.recipe)})
    started = time.perf_counter()
    base = load_base(smollm2_path(cache_dir=ROOT / ".cache"), quantize="nf4")
    print(f"nf4 base loaded in {time.perf_counter() - started:.0f}s; recipe {json.dumps(recipe.to_dict())}")
    model, tokenizer = base.model, base.tokenizer
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


if __name__ == "__main__":
    main()
