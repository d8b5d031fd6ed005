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
"""

from __future__ import annotations

import argparse
import copy
import sys
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
from hub.composition import RouterConfig  # noqa: E402
from hub.formats import read_adapter  # noqa: E402
from hub.runtime import attach, load_base  # noqa: E402
from hub.runtime.pretrained import smollm2_path  # noqa: E402

EXPERTS = 4


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-nf4", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeat}")
    fp32 = load_base(smollm2_path(cache_dir=CACHE)).model
    folders = make_adapters(fp32, CACHE / "bench-runtime-adapters", EXPERTS)
    adapters = [read_adapter(f) for f in folders]
    mixture_peft = xlora(fp32, folders)
    prefill(fp32, adapters, folders, mixture_peft, args.repeat, nf4=not args.skip_nf4)
    generation(fp32, adapters, mixture_peft, args.repeat)


if __name__ == "__main__":
    main()
