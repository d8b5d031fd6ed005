"""Merging LoRAs: hub.composition.merge against PEFT's add_weighted_adapter on the same inputs, in one run.

1. One module of 4096×4096 and one of 11008×4096, n=4 adapters of rank 16, output rank 16: our factored ``svd``
   (QR of the stacked factors + SVD of a 64×64 core) against PEFT's ``svd`` (dense deltas + full SVD), with
   PEFT's default full_matrices=True and with full_matrices=False. Both should reach the optimal truncation
   error; the script prints each one's relative error against the exact weighted sum.
2. SmolLM2-135M (30 layers × 7 projections = 210 modules), n = 2/4/8 adapters of rank 16: ``exact`` against
   PEFT's ``cat``, and ``svd`` at rank 16 against PEFT's ``svd``.

Our timings include validating the inputs and hashing them for the recipe (best of 3 runs; PEFT's are one run
each, too slow to repeat) and exclude loading the adapters, as PEFT's do. torch uses its default threads.

    .venv/bin/python bench/bench_merge_svd.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.composition.merge import merge  # noqa: E402
from hub.errors import NotFound  # noqa: E402
from hub.formats import read_adapter  # noqa: E402
from hub.runtime.pretrained import smollm2_path  # noqa: E402

RANK = 16
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class OneLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def timed(call, *args, repeat: int = 1, **kwargs):
    """(best wall time of ``repeat`` calls, the last result)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = call(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, result


def with_adapters(model: nn.Module, n: int, targets: list[str], folder: Path):
    """Add n random rank-16 LoRAs to ``model`` with PEFT; return the PEFT model, their names and hub Adapters."""
    names = [f"a{i}" for i in range(n)]
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    peft_model.save_pretrained(folder)
    return peft_model, names, [read_adapter(folder / name) for name in names]


def peft_merge(peft_model, names: list[str], weights: list[float], name: str, kind: str, **options) -> float:
    # add_weighted_adapter silently does nothing when `name` exists: every call needs a fresh name.
    assert name not in peft_model.peft_config
    seconds, _ = timed(peft_model.add_weighted_adapter, names, weights, name, combination_type=kind, **options)
    return seconds


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    return {path: module for path, module in peft_model.base_model.model.named_modules()
            if isinstance(module, LoraLayer)}


def exact_sum(layer: LoraLayer, names: list[str], weights: list[float]) -> torch.Tensor:
    with torch.no_grad():
        return sum(w * layer.get_delta_weight(name) for name, w in zip(names, weights, strict=True))


def ours_delta(adapter, path: str) -> torch.Tensor:
    params = adapter.modules()[path]
    return params["lora_B.weight"] @ params["lora_A.weight"]


def relative(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def bench_module(out_features: int, in_features: int, n: int = 4) -> None:
    weights = [1.0, -0.5, 0.8, 0.3][:n]
    with tempfile.TemporaryDirectory() as tmp:
        peft_model, names, adapters = with_adapters(OneLinear(out_features, in_features), n, ["proj"], Path(tmp))
    ours_s, result = timed(merge, adapters, weights, strategy="svd", rank=RANK, repeat=3)
    peft_full_s = peft_merge(peft_model, names, weights, "svd_full", "svd", svd_rank=RANK)
    peft_thin_s = peft_merge(peft_model, names, weights, "svd_thin", "svd", svd_rank=RANK, svd_full_matrices=False)
    layer = lora_layers(peft_model)["proj"]
    exact = exact_sum(layer, names, weights)
    with torch.no_grad():
        peft_error = relative(layer.get_delta_weight("svd_full"), exact)
        peft_thin_error = relative(layer.get_delta_weight("svd_thin"), exact)
    ours_error = relative(ours_delta(result.adapter, "proj"), exact)
    print(f"{out_features}×{in_features}, n={n}, r={RANK}→{RANK}: ours {ours_s * 1e3:.0f} ms, "
          f"PEFT svd {peft_full_s:.1f} s (full_matrices=False: {peft_thin_s:.1f} s), "
          f"ratio {peft_full_s / ours_s:.0f}× ({peft_thin_s / ours_s:.0f}×); "
          f"relative error vs exact sum: ours {ours_error:.4f}, PEFT {peft_error:.4f} ({peft_thin_error:.4f})")


def smollm2_model() -> tuple[LlamaForCausalLM, str]:
    try:
        folder = smollm2_path(cache_dir=ROOT / ".cache")
        return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), "SmolLM2-135M-Instruct"
    except NotFound as error:
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval(), f"random weights of SmolLM2's shapes ({error})"


def bench_smollm2() -> None:
    model, label = smollm2_model()
    with tempfile.TemporaryDirectory() as tmp:
        peft_model, names, adapters = with_adapters(model, 8, SMOLLM2_TARGETS, Path(tmp))
    layers = lora_layers(peft_model)
    print(f"\n{label}: {len(layers)} modules, rank-{RANK} adapters, output rank {RANK} for svd")
    for n in (2, 4, 8):
        subset, inputs = names[:n], adapters[:n]
        weights = [1.0 / n] * n
        ours_exact_s, _ = timed(merge, inputs, weights, strategy="exact", repeat=3)
        peft_cat_s = peft_merge(peft_model, subset, weights, f"cat{n}", "cat")
        ours_svd_s, result = timed(merge, inputs, weights, strategy="svd", rank=RANK, repeat=3)
        peft_svd_s = peft_merge(peft_model, subset, weights, f"svd{n}", "svd", svd_rank=RANK)
        ours_error = peft_error = total = 0.0
        with torch.no_grad():
            for path, layer in layers.items():
                exact = exact_sum(layer, subset, weights)
                total += exact.norm().item() ** 2
                ours_error += (ours_delta(result.adapter, path) - exact).norm().item() ** 2
                peft_error += (layer.get_delta_weight(f"svd{n}") - exact).norm().item() ** 2
        for name in (f"cat{n}", f"svd{n}"):
            peft_model.delete_adapter(name)
        print(f"n={n}: exact ours {ours_exact_s:.2f} s vs PEFT cat {peft_cat_s:.2f} s "
              f"(ratio {peft_cat_s / ours_exact_s:.1f}×); svd ours {ours_svd_s:.2f} s vs PEFT svd {peft_svd_s:.1f} s "
              f"(ratio {peft_svd_s / ours_svd_s:.0f}×); svd relative error vs exact: "
              f"ours {(ours_error / total) ** 0.5:.4f}, PEFT {(peft_error / total) ** 0.5:.4f}")


def main() -> None:
    # The machine is shared: the load average tells how much of it the figures below had.
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; ours: best of 3 runs, PEFT: one run")
    bench_module(4096, 4096)
    bench_module(11008, 4096)
    bench_smollm2()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
