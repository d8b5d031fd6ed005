"""LoftQ against plain QLoRA initialisation on SmolLM2-135M-Instruct (nf4), the real base in .cache/.

1. Per layer, on the q_proj / v_proj weights W (fp32 safetensors): ``‖W − Q‖_F`` of the plain nf4 base against
   ``‖W − (Q_T + s·B A)‖_F`` after LoftQ (``hub.methods.loftq.loftq_factors`` with the nf4 layers' own
   bitsandbytes quantiser), for ``--iters`` alternations each, at ``--rank`` / ``--alpha``.
2. The same short training (``--steps`` on the date task, the same recipe and seed) from a zero-initialised LoRA
   on the plain nf4 base and from the LoftQ-initialised LoRA on its derived base: the completion loss on the test
   split before training (with the fp32 base for reference), each step's training loss, and the test loss and
   exact match after training.

PEFT 0.21.2's ``loftq_init`` is the peer; it quantises on CUDA/XPU only, so on a CPU-only machine the script says
so instead of timing it.

    OMP_NUM_THREADS=1 .venv/bin/python -u bench/bench_loftq.py [--rank 8] [--alpha 16] [--iters 1,5] [--steps 20]
        [--test 30] [--threads 1] [--train-targets q_proj,v_proj] [--train-iters 5] [--skip-table] [--skip-training]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.evaluate import evaluate  # noqa: E402
from hub.methods.loftq import loftq_factors, quantiser  # noqa: E402
from hub.runtime import attach, load_base  # noqa: E402
from hub.runtime.pretrained import smollm2_path  # noqa: E402
from hub.sites import base_weight  # noqa: E402
from hub.tasks import examples  # noqa: E402
from hub.train import Recipe, new_adapter, train  # noqa: E402

TARGETS = ("q_proj", "v_proj")


def error_table(folder: Path, rank: int, alpha: float, iterations: list[int]) -> None:
    base = load_base(folder, quantize="nf4")
    scale = alpha / rank
    layers = {path: module for path, module in base.model.named_modules() if path.endswith(TARGETS)}
    header = f"{'module':<34} {'plain nf4':>10}" + "".join(f" {f'LoftQ T={t}':>11} {'ratio':>6}" for t in iterations)
    print(f"‖W − W_eff‖_F per module, rank {rank}, alpha {alpha:g} (s = {scale:g})\n{header}")
    totals = [0.0] * (1 + len(iterations))
    below = True
    started = time.perf_counter()
    with safe_open(folder / "model.safetensors", framework="pt", device="cpu") as handle:
        for path, module in layers.items():
            weight = handle.get_tensor(f"{path}.weight").float()
            plain = float(torch.linalg.norm(weight - base_weight(module).float()))
            errors = []
            for t in iterations:
                f = loftq_factors(weight, rank=rank, scale=scale, quantise=quantiser(module), iterations=t)
                errors.append(float(torch.linalg.norm(weight - (f.quantized + scale * f.b @ f.a))))
            below = below and all(e < plain for e in errors)
            for i, value in enumerate([plain, *errors]):
                totals[i] += value**2
            name = path.removeprefix("model.layers.").replace(".self_attn", "")
            print(f"{name:<34} {plain:>10.4f}" + "".join(f" {e:>11.4f} {e / plain:>6.3f}" for e in errors))
    root = [v**0.5 for v in totals]
    print(f"{'all (root of summed squares)':<34} {root[0]:>10.4f}"
          + "".join(f" {e:>11.4f} {e / root[0]:>6.3f}" for e in root[1:]))
    print(f"LoftQ below plain nf4 in every module: {'yes' if below else 'NO'}"
          f" ({len(layers)} modules, {time.perf_counter() - started:.1f}s for all fits)")
    try:
        from peft.utils.loftq_utils import loftq_init

        with safe_open(folder / "model.safetensors", framework="pt", device="cpu") as handle:
            weight = handle.get_tensor(f"{next(iter(layers))}.weight")
        loftq_init(weight, num_bits=4, reduced_rank=rank, num_iter=1)
        print("PEFT loftq_init ran on this machine")
    except Exception as exc:  # noqa: BLE001 - the peer's failure is the figure here
        print(f"PEFT 0.21.2 loftq_init on this machine: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")


def test_loss(model: torch.nn.Module, tokenizer, test, generate: bool = False) -> tuple[float, float]:
    result = evaluate(model, tokenizer, test, batch_size=len(test), generate=generate, progress=False)
    return result.as_metrics()["loss"], result.exact_match if generate else float("nan")


def training(folder: Path, args: argparse.Namespace) -> None:
    train_set, test = examples("date", "train", 1000), examples("date", "test", args.test)
    targets = args.train_targets.split(",")
    common = dict(rank=args.rank, alpha=args.alpha, targets=targets, steps=args.steps, seed=0)
    plain = Recipe(**common)
    loftq = Recipe(**common, options={"init_lora_weights": "loftq",
                                      "loftq_config": {"loftq_bits": 4, "loftq_iter": args.train_iters}})
    full = load_base(folder)
    print(f"\ndate task, {args.steps} steps, rank {args.rank}, alpha {args.alpha:g}, targets {', '.join(targets)}")
    print(f"test loss before training: fp32 base {test_loss(full.model, full.tokenizer, test)[0]:.4f}")
    del full
    runs = {}
    for label, recipe in (("zero init (QLoRA)", plain), (f"LoftQ T={args.train_iters}", loftq)):
        base = load_base(folder, quantize="nf4")
        started = time.perf_counter()
        initial = new_adapter(base.model, recipe, tokenizer=base.tokenizer)  # LoftQ rewrites the base here
        init_seconds = time.perf_counter() - started
        handle = attach(base.model, initial)
        before = test_loss(base.model, base.tokenizer, test)[0]
        handle.detach()
        # train() makes the same adapter again: on the LoftQ base that is LoftQ of the already-derived base, so
        # train a fresh load for a like-for-like run.
        base = load_base(folder, quantize="nf4")
        result = train(base.model, base.tokenizer, train_set, recipe, progress=False)
        handle = attach(base.model, result.adapter)
        after, exact = test_loss(base.model, base.tokenizer, test, generate=True)
        handle.detach()
        runs[label] = result.losses
        print(f"{label:<18} init {init_seconds:5.1f}s  test loss before {before:.4f}  after {after:.4f}  exact match"
              f" {exact:.2f}  train {result.seconds:.0f}s")
    print("training loss per step:\nstep " + "".join(f"{label:>20}" for label in runs))
    for step in range(args.steps):
        print(f"{step + 1:>4} " + "".join(f"{losses[step]:>20.4f}" for losses in runs.values()))
    last = min(5, args.steps)
    print(f"mean of the last {last} " + "".join(f"{sum(v[-last:]) / last:>20.4f}" for v in runs.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--iters", default="1,5", help="comma-separated LoftQ iteration counts for the table")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--test", type=int, default=30, help="test examples of the date task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-targets", default=",".join(TARGETS), help="comma-separated modules to train")
    parser.add_argument("--train-iters", type=int, help="LoftQ iterations for training (default: the largest of"
                        " --iters)")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    args.iters = [int(t) for t in args.iters.split(",")]
    args.train_iters = args.train_iters or max(args.iters)
    torch.set_num_threads(args.threads)
    folder = smollm2_path(cache_dir=ROOT / ".cache")
    if not args.skip_table:
        error_table(folder, args.rank, args.alpha, args.iters)
    if not args.skip_training:
        # LoftQ writes its derived base (a copy of the model) under HUB_HOME: keep it out of the user's.
        with tempfile.TemporaryDirectory(prefix="bench-loftq-") as home:
            os.environ["HUB_HOME"] = home
            training(folder, args)


if __name__ == "__main__":
    main()
