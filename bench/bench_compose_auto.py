"""Picking from a pool of adapters with a few examples: ``Hub.rank`` and ``compose(weights="auto")`` (LoraHub).

The pool, on SmolLM2-135M-Instruct nf4: the three built-in task experts (date, name, record; the ``task_experts``
test fixture's cache, trained here with the same recipe when absent), ``--randoms`` of the eight random LoRAs of
bench_runtime (r=16 on every projection) and, with ``--trained-distractors``, four LoRAs trained with the same
recipe on other formats over the same words (upper-casing, word reversal, and the inverses of the date and record
tasks; a few minutes each on a busy CPU, then cached under .cache/bench-compose-auto). One run:

1. Rank: five test examples of each task; the position of the task's own expert among the whole pool (exact match
   first, then loss), and the seconds the ranking took (one base load, every adapter attached in turn).
2. Every single adapter and the fixed-weight merges (uniform 1/K over the pool, 1/3 over the experts, the experts
   at 1 each; with ``--grid`` also each expert at 1 with another at 0.25 or 0.5, and all three at 0.5) scored by
   exact match on ``--test`` held-out examples per task (a single adapter is the one-hot fixed-weight merge: "best
   single" is the best of them).
3. A mixed few-shot set (N per task): ``compose(pool, "auto")`` (``--start rank``: the default, retrieval first;
   ``--start zero --objective loss``: LoraHub's search from 0 over every weight) merged (exact sum) and scored on
   the same test examples, against every fixed merge of step 2, per task and mixed (the mean over the tasks), and
   its time.
4. Auto weights per task, fitted on N train examples of the task, against the task's own expert (target: >= 95%
   of it), the best single adapter and the best fixed merge on that task.

    .venv/bin/python bench/bench_compose_auto.py [--threads 2] [--sizes 5,20] [--test 30] [--budget 40]
        [--randoms 8] [--trained-distractors] [--start rank|zero] [--sigma 0.5] [--top-k 3] [--rank-by-loss]
        [--objective match_probability|loss] [--grid]
        [--tasks date,name,record (empty: no step 4)] [--skip-rank] [--skip-mixed]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_runtime import CACHE, make_adapters  # noqa: E402

from hub import compose  # noqa: E402
from hub.client import Hub  # noqa: E402
from hub.composition.auto import SearchConfig  # noqa: E402
from hub.data import Example  # noqa: E402
from hub.evaluate import evaluate  # noqa: E402
from hub.formats import Adapter, read_adapter, write_adapter  # noqa: E402
from hub.runtime import Base, load_base  # noqa: E402
from hub.runtime.pretrained import smollm2_path  # noqa: E402
from hub.tasks import CITIES, FIRST_NAMES, TASKS, examples  # noqa: E402
from hub.train import Recipe, train  # noqa: E402

FOLDER = CACHE / "bench-compose-auto"
RANDOM_LORAS = 8


def _upper(rng: random.Random) -> Example:
    words = [rng.choice(FIRST_NAMES + CITIES) for _ in range(2)]
    return Example(prompt=f"upper {' '.join(words)} ->", completion=" " + " ".join(w.upper() for w in words))


def _reverse(rng: random.Random) -> Example:
    words = [rng.choice(FIRST_NAMES + CITIES) for _ in range(3)]
    return Example(prompt=f"reverse {' '.join(words)} ->", completion=" " + " ".join(reversed(words)))


def _undate(rng: random.Random) -> Example:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return Example(prompt=f"undate {day:02d}/{month:02d}/{year:04d} ->",
                   completion=f" {year:04d}-{month:02d}-{day:02d}")


def _unrecord(rng: random.Random) -> Example:
    first, city, age = rng.choice(FIRST_NAMES), rng.choice(CITIES), rng.randint(18, 90)
    return Example(prompt=f'unrecord {{"name": "{first}", "age": {age}, "city": "{city}"}} ->',
                   completion=f" {first};{age};{city}")


# Trained distractors: other formats over the same vocabulary, two of them the inverse of a built-in task's.
DISTRACTORS = {"upper": _upper, "reverse": _reverse, "undate": _undate, "unrecord": _unrecord}


def trained(base: Base, name: str, data: list[Example]) -> Adapter:
    """A LoRA trained with the default recipe on ``data``, cached under .cache/bench-compose-auto."""
    target = FOLDER / f"{name}-{base.fingerprint.weights_hash[:12]}"
    if not target.is_dir():
        write_adapter(train(base.model, base.tokenizer, data, Recipe(), progress=False).adapter, target)
    return read_adapter(target)


def task_expert(base: Base, name: str) -> Adapter:
    """The ``task_experts`` fixture's cached expert when there is one, else trained as it trains them."""
    cached = sorted((CACHE / "experts").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    if cached:
        return read_adapter(cached[-1])
    return trained(base, f"expert-{name}", examples(name, "train", 1000))


def exact_match(base: Base, composition, test: list[Example]) -> float:
    handle = composition.attach(base.model)
    try:
        return evaluate(base.model, base.tokenizer, test, progress=False).exact_match
    finally:
        handle.detach()


def row(label: str, scores: dict[str, float], extra: str = "") -> str:
    mixed = sum(scores.values()) / len(scores)
    return f"| {label} | " + " | ".join(f"{v:.2f}" for v in scores.values()) + f" | {mixed:.2f} |{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="5,20", help="examples per task to fit the weights on")
    parser.add_argument("--test", type=int, default=30, help="held-out test examples per task")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--start", choices=["rank", "zero"], default="rank")
    parser.add_argument("--sigma", type=float, default=SearchConfig.sigma)
    parser.add_argument("--top-k", type=int, default=SearchConfig.top_k)
    parser.add_argument("--method", choices=["cma", "gradient"], default="cma")
    parser.add_argument("--objective", choices=["match_probability", "loss"], default=SearchConfig.objective)
    parser.add_argument("--tasks", default=",".join(TASKS), help="the tasks of step 4 (empty: none)")
    parser.add_argument("--randoms", type=int, default=RANDOM_LORAS, help="random LoRAs in the pool")
    parser.add_argument("--skip-rank", action="store_true")
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument("--trained-distractors", action="store_true")
    parser.add_argument("--grid", action="store_true", help="step 2: also pairs of experts at 1 and 0.25 / 0.5")
    parser.add_argument("--rank-by-loss", action="store_true", help="rank without generating (no exact match)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ["HUB_HOME"] = tempfile.mkdtemp(prefix="bench-compose-auto-")
    hub = Hub()
    path = smollm2_path(cache_dir=CACHE)  # the tests' converted copy
    base = load_base(path, quantize="nf4")
    randoms = CACHE / "bench-runtime-adapters"
    present = all((randoms / f"lora{i}" / "adapter_model.safetensors").exists() for i in range(RANDOM_LORAS))
    fp32_folders = make_adapters(None if present else load_base(path).model, randoms, RANDOM_LORAS)[:args.randoms]
    rng = random.Random(0)
    pool: dict[str, Adapter] = {name: task_expert(base, name) for name in TASKS}
    if args.trained_distractors:
        pool.update({name: trained(base, name, [make(rng) for _ in range(400)]) for name, make in DISTRACTORS.items()})
    pool.update({f"random{i}": read_adapter(folder) for i, folder in enumerate(fp32_folders)})
    for name, adapter in pool.items():
        hub.register(adapter, name=name, base=path)
    refs = [f"{name}@1" for name in pool]
    print(f"pool: {len(refs)} adapters on SmolLM2-135M nf4: {', '.join(pool)}; torch threads {args.threads}")

    order = "loss alone" if args.rank_by_loss else "exact match, then loss"
    chosen = [name for name in args.tasks.split(",") if name]
    if not args.skip_rank:
        print(f"\n## 1. rank: five test examples per task, the whole pool, by {order}\n")
        print("| task | expert's position | top-1 | its exact match | its loss | next best (loss) | seconds |")
        print("|---|---:|---|---:|---:|---|---:|")
    for name in [] if args.skip_rank else TASKS:
        start = time.perf_counter()
        results = hub.rank(examples(name, "test", 5), base=base, generate=not args.rank_by_loss)
        seconds = time.perf_counter() - start
        position = [r.ref for r in results].index(f"{name}@1") + 1
        top, second = results[0], results[1]
        exact = "-" if args.rank_by_loss else f"{top.exact_match:.2f}"
        print(f"| {name} | {position} of {len(results)} | {top.ref} | {exact} | {top.loss:.3f} "
              f"| {second.ref} ({second.loss:.3f}) | {seconds:.1f} |", flush=True)

    tests = {name: examples(name, "test", args.test) for name in TASKS}
    experts = [f"{name}@1" for name in TASKS]
    # Every single adapter (the one-hot merges) on every task's test set: one rank per task, generating.
    singles: dict[str, dict[str, float]] = {ref: {} for ref in refs}
    for name in TASKS:
        for result in hub.rank(tests[name], base=base, candidates=refs):
            singles[result.ref][name] = result.exact_match
    fixed = {"uniform 1/K over the pool": compose(refs, [1 / len(refs)] * len(refs), hub=hub),
             "uniform 1/3 over the experts": compose(experts, [1 / 3] * 3, hub=hub),
             "the experts at 1 each": compose(experts, hub=hub)}
    if args.grid:  # is any static weighting of the experts better than the best one alone?
        fixed.update({f"{a} 1 + {b} {w}": compose([a, b], [1.0, w], hub=hub)
                      for a in experts for b in experts if a != b for w in (0.25, 0.5)})
        fixed["the experts at 0.5 each"] = compose(experts, [0.5] * 3, hub=hub)
    fixed_scores = {label: {name: exact_match(base, c, tests[name]) for name in TASKS} for label, c in fixed.items()}
    best_single = max(refs, key=lambda ref: sum(singles[ref].values()))
    print(f"\n## 2. fixed-weight merges, exact match on {args.test} held-out examples per task\n")
    print("| composition | " + " | ".join(TASKS) + " | mixed |")
    print("|---|" + "---:|" * (len(TASKS) + 1))
    for ref in refs:
        print(row(f"{ref} alone", singles[ref]))
    for label, scores in fixed_scores.items():
        print(row(label, scores), flush=True)

    settings = SearchConfig(method=args.method, budget=args.budget, sigma=args.sigma, start=args.start,
                            top_k=args.top_k if args.start == "rank" else None, objective=args.objective)
    if not args.skip_mixed:
        print(f"\n## 3. mixed few-shot sets (N per task) vs every fixed-weight merge above ({settings.to_dict()})\n")
        print("| composition | " + " | ".join(TASKS) + " | mixed | search s |")
        print("|---|" + "---:|" * (len(TASKS) + 2))
        print(row(f"best single ({best_single} alone)", singles[best_single], " |"))
        for label, scores in fixed_scores.items():
            print(row(label, scores, " |"))
        for size in sizes:
            mixed = [ex for name in TASKS for ex in examples(name, "train", size)]
            auto = compose(refs, "auto", examples=mixed, base=base, search=settings, hub=hub)
            scores = {name: exact_match(base, auto, tests[name]) for name in TASKS}
            print(row(f"auto, {size} per task", scores, f" {auto.search.seconds:.1f} |"), flush=True)
            print(f"<!-- weights: {', '.join(f'{r} {w:+.2f}' for r, w in zip(refs, auto.search.weights, strict=True))}"
                  f"; {auto.search.evaluations} evaluations, objective {auto.search.objective:.3f}, loss "
                  f"{auto.search.loss:.3f} -->")
    print("\n## 4. auto weights over the whole pool, per task\n")
    print("| task | fit examples | auto | own expert | auto / expert | best single | best fixed merge "
          "| top weights | search s |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for name in chosen:
        expert = singles[f"{name}@1"][name]
        single = max(singles[ref][name] for ref in refs)
        merge = max(scores[name] for scores in fixed_scores.values())
        for size in sizes:
            merged = compose(refs, "auto", examples=examples(name, "train", size), base=base, search=settings,
                             hub=hub)
            score = exact_match(base, merged, tests[name])
            top = sorted(zip(refs, merged.search.weights, strict=True), key=lambda p: -abs(p[1]))[:3]
            ratio = score / expert if expert else float("nan")
            print(f"| {name} | {size} | {score:.2f} | {expert:.2f} | {ratio:.2f} | {single:.2f} | {merge:.2f} | "
                  f"{', '.join(f'{r} {w:+.2f}' for r, w in top)} | {merged.search.seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
