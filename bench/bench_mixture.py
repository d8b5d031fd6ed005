"""Mixture benchmark: the forward cost of a 4-expert gated mixture relative to one attached LoRA, hub vs PEFT X-LoRA.

Same model (SmolLM2-135M), same four LoRA experts (r=16 on q,k,v,o,gate,up,down), same tokens, one run:

1. Prefill B×S=(4, 64), fp32: one LoRA, then the 4-expert mixture; the ratio mixture / one LoRA for the hub's
   layerwise router, its two-pass router, and PEFT's X-LoRA (two passes, layerwise scalings, depth 1).
2. The same on nf4 for the hub; PEFT's X-LoRA is tried on nf4 and its error printed (it does not run there).
3. Generation: time per new token with 64 tokens of context (B=1). The hub's mixture decodes with the KV cache
   (dense gates and top_k=1); PEFT's X-LoRA has no cache, so each new token re-runs both passes over the context.

Before timing, the hub's mixture with its initial (equal) gates is checked against the four experts attached as a
stack at weight 1/4 each (max |Δlogits| printed).

    .venv/bin/python bench/bench_mixture.py [--threads 1] [--repeat 5] [--skip-nf4]

With ``--fit``: gate quality from little data instead. Three LoRA experts (one per built-in task, trained on nf4
SmolLM2 with the default Recipe, cached in .cache/bench-mixture-experts); per seed, a different sample of
``--per-task`` train examples per task, the gate fitted on them (seeded), and exact match on ``--test`` test examples
per task, as the ratio mixture / oracle (each task answered by its own expert) on the mixed set: mean ± spread over
seeds, per candidate setting (FIT_CONFIGS, or a JSON object of Mixture.fit options with an optional "router").
Exact match is teacher-forced by default (every completion token and EOS the greedy choice: exactly the examples
greedy generation reproduces, for a fraction of the time); ``--generate`` decodes.

    OMP_NUM_THREADS=1 .venv/bin/python -u bench/bench_mixture.py --fit [--configs old,sequence] [--seeds 0,1,2]
        [--per-task 50] [--test 30] [--generate]

Measured (2-core CPU shared with other jobs; 50 per task, 30 test per task, teacher-forced; oracle 1.00 / 1.00 /
0.87, mixed 0.956), mixture / oracle on seeds 0, 1, 2:
  old (per-token gates, 40 steps, lr 1e-2): 0.953, 0.953, 0.977: mean 0.961 ± 0.011; the record task loses 2-4 of
      30 answers to the other experts;
  sequence routing, same fit: 1.000, 0.977, 0.977: mean 0.985 ± 0.011; record loses 0-2;
  tried and dropped: 20% of the examples held out for early stopping (seed 0: 0.953, the best held-out loss at the
      last step: nothing to stop at 40 steps).
The old "0.87 of the oracle at 40 per task" was measured on 10 test examples per task (one answer = 0.033).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_runtime import CACHE, interleaved, make_adapters  # noqa: E402
from peft import PeftModel, XLoraConfig, get_peft_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from hub import compose  # noqa: E402
from hub.composition import MixtureHandle, RouterConfig  # noqa: E402
from hub.data import collate, encode  # noqa: E402
from hub.formats import Adapter, read_adapter, write_adapter  # noqa: E402
from hub.runtime import Base, attach, load_base  # noqa: E402
from hub.runtime.pretrained import smollm2_path  # noqa: E402
from hub.tasks import TASKS, examples  # noqa: E402
from hub.train import Recipe, train  # noqa: E402

EXPERTS = 4
EXPERT_TRAIN_EXAMPLES = 1000  # as the ``task_experts`` test fixture: the task's whole train split


def task_experts(base: Base) -> dict[str, Adapter]:
    """One LoRA per built-in task, trained on ``base`` (nf4) with the default ``Recipe`` as the ``task_experts``
    fixture does; cached under .cache/bench-mixture-experts by recipe, base and task (delete it to retrain)."""
    recipe = Recipe()
    folder = CACHE / "bench-mixture-experts"
    experts = {}
    for name in TASKS:
        key = json.dumps({"recipe": recipe.to_dict(), "base": base.fingerprint.weights_hash, "task": name,
                          "examples": EXPERT_TRAIN_EXAMPLES}, sort_keys=True)
        target = folder / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        if not target.is_dir():
            data = examples(name, "train", EXPERT_TRAIN_EXAMPLES)
            result = train(base.model, base.tokenizer, data, recipe, progress=False)
            write_adapter(result.adapter, target)
        experts[name] = read_adapter(target)
    return experts


def xlora(model: torch.nn.Module, folders: list[Path]) -> torch.nn.Module:
    """PEFT's X-LoRA over the experts (its keys must be "0", "1", ...; it refuses a model that uses the cache)."""
    model = copy.deepcopy(model)
    model.config.use_cache = False
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, xlora_depth=1,
                         layerwise_scalings=True, adapters={str(i): str(f) for i, f in enumerate(folders)})
    return get_peft_model(model, config).eval()


def hub_models(load: Callable[[], torch.nn.Module], adapters) -> dict[str, torch.nn.Module]:
    """One model per hub contender (so they can be timed interleaved): one LoRA, and the two mixtures."""
    models = {"one": load()}
    attach(models["one"], adapters[0], name="one")
    for kind in ("layerwise", "two_pass"):
        models[kind] = load()
        compose(adapters, kind="mixture", router=RouterConfig(kind=kind)).attach(models[kind])
    return models


def check_equal_gates_are_the_average(model: torch.nn.Module, adapters, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        handle = compose(adapters, kind="mixture").attach(model)
        mixed = model(tokens).logits
        handle.detach()
        stack = attach(model, adapters, weight=[1 / len(adapters)] * len(adapters))
        averaged = model(tokens).logits
        stack.detach()
    return (mixed - averaged).abs().max().item()


def prefill(fp32: torch.nn.Module, adapters, folders: list[Path], mixture_peft, repeat: int, nf4: bool) -> None:
    tokens = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(1))
    print(f"equal gates vs the experts stacked at 1/{EXPERTS}: max |Δlogits| "
          f"{check_equal_gates_are_the_average(fp32, adapters, tokens):.1e}")
    models = hub_models(lambda: copy.deepcopy(fp32), adapters)
    models["peft one"] = PeftModel.from_pretrained(copy.deepcopy(fp32), folders[0]).eval()
    calls = {label: (lambda m=m: m(input_ids=tokens)) for label, m in models.items()}
    calls["peft xlora"] = lambda: mixture_peft(input_ids=tokens)
    with torch.no_grad():
        t = interleaved(calls, repeat)
    print(f"prefill fp32 B×S={tuple(tokens.shape)}: one LoRA hub {t['one'] * 1e3:.1f} ms, peft "
          f"{t['peft one'] * 1e3:.1f} ms; {EXPERTS}-expert mixture hub layerwise {t['layerwise'] * 1e3:.1f} ms, "
          f"hub two-pass {t['two_pass'] * 1e3:.1f} ms, peft X-LoRA {t['peft xlora'] * 1e3:.1f} ms")
    print(f"  mixture / one LoRA:  hub layerwise {t['layerwise'] / t['one']:.2f}x   hub two-pass "
          f"{t['two_pass'] / t['one']:.2f}x   peft X-LoRA {t['peft xlora'] / t['peft one']:.2f}x")
    del models, calls
    if not nf4:
        return

    def load_nf4() -> torch.nn.Module:
        return load_base(smollm2_path(cache_dir=CACHE), quantize="nf4").model

    models = hub_models(load_nf4, adapters)
    with torch.no_grad():
        t = interleaved({label: (lambda m=m: m(input_ids=tokens)) for label, m in models.items()}, repeat)
    try:
        with torch.no_grad():
            xlora(load_nf4(), folders)(input_ids=tokens)
        peft_nf4 = "runs"
    except Exception as exc:  # whatever PEFT raises is the finding
        peft_nf4 = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    print(f"prefill nf4  B×S={tuple(tokens.shape)}: one LoRA hub {t['one'] * 1e3:.1f} ms; mixture / one LoRA: "
          f"hub layerwise {t['layerwise'] / t['one']:.2f}x   hub two-pass {t['two_pass'] / t['one']:.2f}x   "
          f"peft X-LoRA {peft_nf4}")


def generation(model: torch.nn.Module, adapters, mixture_peft, repeat: int) -> None:
    """Per new token at 64 tokens of context: the hub decodes one token against the cache, X-LoRA re-runs all."""
    context = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(2))
    step = torch.randint(0, 49152, (1, 1), generator=torch.Generator().manual_seed(3))
    timings = {}
    for label, router in (("dense", RouterConfig()), ("top-1", RouterConfig(top_k=1))):
        mixture = compose(adapters, kind="mixture", router=router)
        handle = mixture.attach(model)
        with torch.no_grad():
            # Distinct gates per token, so top-1 picks different experts at different layers.
            for param in mixture.module.parameters():
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(4)))
            cache = DynamicCache(config=model.config)
            model(context, past_key_values=cache, use_cache=True)

            def decode(cache: DynamicCache = cache) -> None:
                model(step, past_key_values=cache, use_cache=True)
                cache.crop(-1)  # drop the new token again: every call decodes at 64 tokens of context

            timings[label] = interleaved({label: decode}, repeat)[label]
        handle.detach()
    full = torch.cat([context, step], dim=1)
    with torch.no_grad():
        timings["xlora"] = interleaved({"xlora": lambda: mixture_peft(input_ids=full)}, repeat)["xlora"]
    print(f"generation, per new token at 64 tokens of context (B=1, fp32): hub mixture with KV cache "
          f"{timings['dense'] * 1e3:.1f} ms (top-1: {timings['top-1'] * 1e3:.1f} ms)   peft X-LoRA (no cache) "
          f"{timings['xlora'] * 1e3:.1f} ms   ratio {timings['xlora'] / timings['dense']:.1f}x")


# Gate fitting from little data: candidate fit settings (Mixture.fit keywords; "router": RouterConfig fields).
FIT_CONFIGS: dict[str, dict] = {
    "old": {"steps": 40, "lr": 1e-2},
    "sequence": {"steps": 40, "lr": 1e-2, "router": {"routing": "sequence"}},
}


def forced_exact_match(base: Base, tests: list, handle) -> float:
    """The share of examples whose every completion token (and EOS) is the model's greedy choice given the ones
    before: exactly the examples greedy generation reproduces, in one teacher-forced forward instead of a decoding
    loop. A sequence-routed mixture pools its gate over the prompt tokens, as in generation."""
    encoded = [encode(base.tokenizer, example, max_length=2048) for example in tests]
    ids, labels, mask = collate(encoded, pad_id=base.tokenizer.pad_token_id)
    if isinstance(handle, MixtureHandle):
        handle.prompt_mask = torch.zeros_like(mask)
        for row, item in enumerate(encoded):
            handle.prompt_mask[row, :item.prompt_length] = 1
    try:
        with torch.no_grad():
            logits = base.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    finally:
        if isinstance(handle, MixtureHandle):
            handle.prompt_mask = None
    targets = labels[:, 1:]
    return ((logits.argmax(-1) == targets) | (targets == -100)).all(1).float().mean().item()


def fit_quality(base: Base, configs: dict[str, dict], seeds: list[int], per_task: int, test: int,
                threads: int, generate: bool) -> None:
    """Mixture exact match / oracle exact match on the mixed test set, the gate fitted on ``per_task`` examples
    per task (a different sample of the train split per seed, and the fit seeded with it)."""
    from statistics import mean, pstdev

    from hub.evaluate import evaluate

    experts = task_experts(base)
    names = list(TASKS)
    tests = {name: examples(name, "test", test) for name in names}

    def exact(handle) -> dict[str, float]:
        try:
            if generate:
                return {name: evaluate(base.model, base.tokenizer, tests[name], batch_size=test,
                                       progress=False).exact_match for name in names}
            return {name: forced_exact_match(base, tests[name], handle) for name in names}
        finally:
            handle.detach()

    oracle = {name: exact(attach(base.model, experts[name], name=name))[name] for name in names}
    oracle_mixed = mean(oracle.values())
    print(f"oracle exact match ({test} test examples per task): "
          + ", ".join(f"{n} {v:.2f}" for n, v in oracle.items()) + f", mixed {oracle_mixed:.3f}")
    pools = {name: examples(name, "train", 1000) for name in names}
    for label, options in configs.items():
        options = dict(options)
        router = RouterConfig(**options.pop("router", {}))
        ratios, seconds = [], []
        for seed in seeds:
            rng = random.Random(seed)
            picked = {name: rng.sample(pools[name], per_task) for name in names}
            train_set = [picked[name][i] for i in range(per_task) for name in names]
            mixture = compose([experts[n] for n in names], kind="mixture", router=router)
            started = time.perf_counter()
            mixture.fit(base.model, base.tokenizer, train_set, seed=seed, progress=False, **options)
            seconds.append(time.perf_counter() - started)
            scores = exact(mixture.attach(base.model))
            ratios.append(mean(scores.values()) / oracle_mixed)
            print(f"  {label} seed {seed}: " + ", ".join(f"{n} {v:.2f}" for n, v in scores.items())
                  + f"; / oracle {ratios[-1]:.3f} (fit {seconds[-1]:.0f}s)", flush=True)
        print(f"{label:>10s} {json.dumps(configs[label])}: mixture / oracle mean {mean(ratios):.3f} "
              f"± {pstdev(ratios):.3f} (min {min(ratios):.3f}, {len(seeds)} seeds), fit {mean(seconds):.0f}s at "
              f"{threads} thread(s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-nf4", action="store_true")
    parser.add_argument("--fit", action="store_true", help="measure gate fitting from little data instead")
    parser.add_argument("--configs", default=",".join(FIT_CONFIGS),
                        help="with --fit: names from FIT_CONFIGS, or a JSON object {label: fit options}")
    parser.add_argument("--seeds", default="0,1,2", help="with --fit: comma-separated seeds")
    parser.add_argument("--per-task", type=int, default=50, help="with --fit: fit examples per task")
    parser.add_argument("--test", type=int, default=30, help="with --fit: test examples per task")
    parser.add_argument("--generate", action="store_true",
                        help="with --fit: exact match by greedy generation (slower) rather than teacher-forced")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fit:
        configs = (json.loads(args.configs) if args.configs.lstrip().startswith("{")
                   else {name: FIT_CONFIGS[name] for name in args.configs.split(",")})
        base = load_base(smollm2_path(cache_dir=CACHE), quantize="nf4")
        fit_quality(base, configs, [int(s) for s in args.seeds.split(",")], args.per_task, args.test, args.threads,
                    args.generate)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeat}")
    fp32 = load_base(smollm2_path(cache_dir=CACHE)).model
    folders = make_adapters(fp32, CACHE / "bench-runtime-adapters", EXPERTS)
    adapters = [read_adapter(f) for f in folders]
    mixture_peft = xlora(fp32, folders)
    prefill(fp32, adapters, folders, mixture_peft, args.repeat, nf4=not args.skip_nf4)
    generation(fp32, adapters, mixture_peft, args.repeat)


if __name__ == "__main__":
    main()
