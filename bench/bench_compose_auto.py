"""Picking from a pool of adapters with a few examples: ``Hub.rank`` and ``compose(weights="auto")`` (LoraHub).

The pool, on SmolLM2-135M-Instruct nf4: the three built-in task experts (date, name, record; the ``task_experts``
test fixture's cache, trained here with the same recipe when absent), the eight random LoRAs of bench_runtime (r=16
on every projection) and, with ``--trained-distractors``, two LoRAs trained on other formats (upper-casing, word
reversal; a few minutes each on a busy CPU, then cached). One run:

1. Rank: five test examples of each task; the position of the task's own expert among the whole pool (exact match
   first, then loss), and the seconds the ranking took (one base load, every adapter attached in turn).
2. Auto weights per task: ``compose(pool, "auto")`` (CMA-ES, LoraHub's defaults: 40 evaluations, [-1.5, 1.5],
   L1 0.05) fitted on N train examples of the task, then merged (exact sum) and scored by exact match on held-out
   test examples, against the task's own expert on the same examples (target: >= 95% of it).
3. A mixed few-shot set (N per task): auto weights against fixed-weight merges (uniform over the pool, uniform over
   the three experts, the experts at 1 each), exact match per task and on the mixed set.

    .venv/bin/python bench/bench_compose_auto.py [--threads 2] [--sizes 5,20] [--test 30] [--budget 40]
        [--trained-distractors] [--rank-by-loss] [--skip-mixed]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="5,20", help="examples per task to fit the weights on")
    parser.add_argument("--test", type=int, default=30, help="held-out test examples per task")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--tasks", default=",".join(TASKS), help="the tasks of sections 1 and 2")
    parser.add_argument("--randoms", type=int, default=RANDOM_LORAS, help="random LoRAs in the pool")
    parser.add_argument("--skip-rank", action="store_true")
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument("--trained-distractors", action="store_true")
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
        pool["upper"] = trained(base, "upper", [_upper(rng) for _ in range(400)])
        pool["reverse"] = trained(base, "reverse", [_reverse(rng) for _ in range(400)])
    pool.update({f"random{i}": read_adapter(folder) for i, folder in enumerate(fp32_folders)})
    for name, adapter in pool.items():
        hub.register(adapter, name=name, base=path)
    refs = list(pool)
    print(f"pool: {len(refs)} adapters on SmolLM2-135M nf4: {', '.join(refs)}; torch threads {args.threads}")

    order = "loss alone" if args.rank_by_loss else "exact match, then loss"
    chosen = args.tasks.split(",")
    print(f"\n## 1. rank: five test examples per task, the whole pool, by {order}\n")
    print("| task | expert's position | top-1 | its exact match | its loss | next best (loss) | seconds |")
    print("|---|---:|---|---:|---:|---|---:|")
    for name in [] if args.skip_rank else chosen:
        start = time.perf_counter()
        results = hub.rank(examples(name, "test", 5), base=base, generate=not args.rank_by_loss)
        seconds = time.perf_counter() - start
        position = [r.ref for r in results].index(f"{name}@1") + 1
        top, second = results[0], results[1]
        exact = "-" if args.rank_by_loss else f"{top.exact_match:.2f}"
        print(f"| {name} | {position} of {len(results)} | {top.ref} | {exact} | {top.loss:.3f} "
              f"| {second.ref} ({second.loss:.3f}) | {seconds:.1f} |")

    tests = {name: examples(name, "test", args.test) for name in TASKS}
    settings = SearchConfig(budget=args.budget)
    print(f"\n## 2. auto weights over the whole pool, per task (exact match on {args.test} held-out examples)\n")
    print("| task | fit examples | auto | own expert | auto / expert | top weights | search s |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name in chosen:
        expert = exact_match(base, compose([f"{name}@1"], hub=hub), tests[name])
        for size in sizes:
            merged = compose(refs, "auto", examples=examples(name, "train", size), base=base, search=settings,
                             hub=hub)
            score = exact_match(base, merged, tests[name])
            top = sorted(zip(refs, merged.search.weights, strict=True), key=lambda p: -abs(p[1]))[:3]
            ratio = score / expert if expert else float("nan")
            print(f"| {name} | {size} | {score:.2f} | {expert:.2f} | {ratio:.2f} | "
                  f"{', '.join(f'{r} {w:+.2f}' for r, w in top)} | {merged.search.seconds:.1f} |")

    if args.skip_mixed:
        return
    size = sizes[0]
    mixed = [ex for name in TASKS for ex in examples(name, "train", size)]
    third = max(10, args.test // 3)
    mixed_tests = {name: tests[name][:third] for name in TASKS}
    experts = [f"{name}@1" for name in TASKS]
    rows = {
        f"auto ({size} per task, whole pool)": compose(refs, "auto", examples=mixed, base=base, search=settings,
                                                        hub=hub),
        "uniform 1/K over the pool": compose(refs, [1 / len(refs)] * len(refs), hub=hub),
        "uniform 1/3 over the experts": compose(experts, [1 / 3] * 3, hub=hub),
        "experts at 1 each": compose(experts, hub=hub),
    }
    print(f"\n## 3. mixed few-shot set ({size} per task) vs fixed-weight merges ({third} test examples per task)\n")
    print("| composition | " + " | ".join(TASKS) + " | mixed |")
    print("|---|" + "---:|" * (len(TASKS) + 1))
    for label, composition in rows.items():
        scores = [exact_match(base, composition, mixed_tests[name]) for name in TASKS]
        print(f"| {label} | " + " | ".join(f"{s:.2f}" for s in scores) + f" | {sum(scores) / len(scores):.2f} |")
    auto = rows[f"auto ({size} per task, whole pool)"].search
    print(f"\nauto on the mixed set: {auto.evaluations} evaluations in {auto.seconds:.1f} s, loss {auto.loss:.3f}, "
          f"weights " + ", ".join(f"{r} {w:+.2f}" for r, w in zip(refs, auto.weights, strict=True)))


if __name__ == "__main__":
    main()
