"""TIES and DARE merges at scale: hub.composition.merge against PEFT's add_weighted_adapter on the same inputs.

Cases, each in a subprocess of its own so that its peak resident memory (ru_maxrss) is its own:

1. SmolLM2-135M-Instruct (the real base, 30 layers × 7 projections = 210 modules), 3 rank-16 LoRAs made by PEFT
   from seeds, weights 1.0/0.5/0.8, density 0.5, output rank 16 (ours; PEFT keeps rank 16 by construction).
2. 7B-shaped (Llama-2-7B: 32 layers × q,k,v,o 4096×4096 and gate,up 11008×4096, down 4096×11008 = 224 modules),
   4 rank-16 LoRAs written directly as PEFT folders (random factors; merging needs only the factors), weights
   1.0/0.5/0.8/0.3, density 0.3, output rank 16. PEFT needs a model object: a stand-in whose base weights are
   zero-stride views (no memory), which is all add_weighted_adapter reads.

Ours merges the true deltas B·A (TIES/DARE as defined on weights); PEFT's ties/dare_ties prune the factors A and
B separately, which is fast but is not TIES of the deltas. On SmolLM2 both are compared with the dense reference
(PEFT's merge_utils on the whole dense deltas; DARE's reference uses our draws, so for PEFT, which draws its own,
the figure includes the difference between two random draws). Times are wall and CPU seconds of the merge call
alone (inputs loaded before); memory is the process's peak RSS and its RSS before the merge. The machine is
shared: the load average is printed beside the figures.

    .venv/bin/python bench/bench_merge_ties.py             # both models
    .venv/bin/python bench/bench_merge_ties.py --layers 4  # the 7B shapes with 4 layers instead of 32

Both sides run on torch's thread count (the printed one; OMP_NUM_THREADS=1 for one): ours merges that many modules
at a time, each on one thread; PEFT splits each operation across them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES_7B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
             "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
             "mlp.down_proj": (4096, 11008)}
SEED = 0


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def make_smollm2_inputs(folder: Path, n: int) -> None:
    from peft import LoraConfig, get_peft_model

    model = smollm2_model()
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", config)
    peft_model.save_pretrained(folder)


def smollm2_model():
    from transformers import LlamaForCausalLM

    from hub.runtime.pretrained import smollm2_path

    return LlamaForCausalLM.from_pretrained(smollm2_path(cache_dir=ROOT / ".cache"), dtype=torch.float32).eval()


def make_7b_inputs(folder: Path, n: int, layers: int) -> None:
    from safetensors.torch import save_file

    for i in range(n):
        gen = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for layer in range(layers):
            for name, (rows, cols) in SHAPES_7B.items():
                prefix = f"base_model.model.model.layers.{layer}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, cols, generator=gen) / math.sqrt(cols)
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, RANK, generator=gen) * 0.01
        out = folder / f"a{i}"
        out.mkdir(parents=True)
        save_file(tensors, out / "adapter_model.safetensors")
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": TARGETS, "task_type": None,
            "base_model_name_or_path": "llama-2-7b-shaped", "lora_dropout": 0.0, "bias": "none"}))


class StandIn(torch.nn.Module):
    """A Llama-shaped module tree whose linear layers have the 7B shapes but zero-stride weights (no memory)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.self_attn, block.mlp = torch.nn.Module(), torch.nn.Module()
            for name, (rows, cols) in SHAPES_7B.items():
                parent, leaf = name.split(".")
                linear = torch.nn.Linear(1, 1, bias=False)
                linear.in_features, linear.out_features = cols, rows
                linear.weight = torch.nn.Parameter(torch.zeros(()).expand(rows, cols), requires_grad=False)
                setattr(getattr(block, parent), leaf, linear)
            self.model.layers.append(block)


# ---------------------------------------------------------------------------------------------------------------
# One case per subprocess


def run_ours(spec: dict) -> dict:
    from hub.composition.merge import merge
    from hub.formats import read_adapter

    adapters = [read_adapter(Path(folder)) for folder in spec["folders"]]
    before = rss_mib()
    start, cpu = time.perf_counter(), time.process_time()
    result = merge(adapters, spec["weights"], strategy=spec["strategy"], density=spec["density"], rank=RANK,
                   seed=SEED)
    out = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "peak_mib": peak_mib(),
           "before_mib": before, "truncation_error": result.truncation_error}
    if spec["reference"]:
        modules = result.adapter.modules()
        merged = {path: p["lora_B.weight"] @ p["lora_A.weight"] for path, p in modules.items()}
        out["vs_reference"] = relative_to_reference(adapters, spec, merged)
    return out


def run_peft(spec: dict) -> dict:
    from peft import PeftModel

    from hub.formats import read_adapter

    base = smollm2_model() if spec["model"] == "smollm2" else StandIn(spec["layers"])
    folders = spec["folders"]
    names = [f"a{i}" for i in range(len(folders))]
    model = PeftModel.from_pretrained(base, folders[0], adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:], strict=True):
        model.load_adapter(folder, adapter_name=name)
    before = rss_mib()
    start, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(SEED)  # PEFT's DARE draws from the global generator
    model.add_weighted_adapter(names, spec["weights"], "merged", combination_type=spec["strategy"],
                               density=spec["density"])
    out = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "peak_mib": peak_mib(),
           "before_mib": before}
    if spec["reference"]:
        from peft.tuners.lora import LoraLayer

        with torch.no_grad():
            merged = {path.removeprefix("base_model.model."): module.get_delta_weight("merged")
                      for path, module in model.named_modules() if isinstance(module, LoraLayer)}
        out["vs_reference"] = relative_to_reference([read_adapter(Path(f)) for f in folders], spec, merged)
    return out


def relative_to_reference(adapters, spec: dict, merged: dict[str, torch.Tensor]) -> float:
    """√(Σ‖merged − reference‖² / Σ‖reference‖²) over all modules, the reference from PEFT's merge_utils on the
    whole dense deltas (DARE with our draws: the stream hub.composition.merge documents)."""
    import hashlib

    import numpy as np
    from peft.utils import merge_utils

    weights = torch.tensor(spec["weights"])
    error = norm = 0.0
    for path, got in merged.items():
        deltas = []
        for adapter in adapters:
            params = adapter.modules()[path]
            scale = adapter.config["lora_alpha"] / adapter.config["r"]
            deltas.append(scale * params["lora_B.weight"] @ params["lora_A.weight"])
        if spec["strategy"] == "ties":
            reference = merge_utils.ties(deltas, weights, spec["density"])
        else:
            key = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
            pruned = []
            for index, delta in enumerate(deltas):
                stream = np.random.SFC64(np.random.SeedSequence([SEED, key, index]))
                draws = stream.random_raw((delta.numel() + 1) // 2).view(np.int32)[:delta.numel()]
                keep = torch.from_numpy(draws < -(2**31) + round(spec["density"] * 2**32)).view_as(delta)
                pruned.append(delta * keep / spec["density"])
            stacked = torch.stack(pruned)
            elected = merge_utils.calculate_majority_sign_mask(stacked)
            reference = merge_utils.disjoint_merge(stacked * weights.view(-1, 1, 1), elected)
        error += (got - reference).norm().item() ** 2
        norm += reference.norm().item() ** 2
    return math.sqrt(error / norm)


# ---------------------------------------------------------------------------------------------------------------
# Driver


def case(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(label: str, result: dict) -> str:
    if "error" in result:
        return f"| {label} | failed: {result['error']} |||||"
    truncation = result.get("truncation_error")
    vs = result.get("vs_reference")
    return (f"| {label} | {result['wall_s']:.1f} | {result['cpu_s']:.1f} | {result['peak_mib']:.0f} "
            f"({result['before_mib']:.0f}) | {'-' if truncation is None else f'{truncation:.3f}'} | "
            f"{'-' if vs is None else f'{vs:.3f}'} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case")
    parser.add_argument("--layers", type=int, default=32, help="layers of the 7B-shaped model (default 32)")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    if args.case:
        spec = json.loads(args.case)
        print(json.dumps(run_ours(spec) if spec["who"] == "ours" else run_peft(spec)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| case | wall s | CPU s | peak RSS MiB (before merge) | truncation error (rank 16) | vs dense reference |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        if not args.skip_smollm2:
            make_smollm2_inputs(Path(tmp) / "smollm2", 3)
            models.append(("SmolLM2-135M, 3 × r16, density 0.5", "smollm2", [1.0, 0.5, 0.8], 0.5,
                           [str(Path(tmp) / "smollm2" / f"a{i}") for i in range(3)], True))
        make_7b_inputs(Path(tmp) / "7b", 4, args.layers)
        models.append((f"7B-shaped ({args.layers} layers, {7 * args.layers} modules), 4 × r16, density 0.3", "7b",
                       [1.0, 0.5, 0.8, 0.3], 0.3, [str(Path(tmp) / "7b" / f"a{i}") for i in range(4)], False))
        for title, model, weights, density, folders, reference in models:
            for strategy in ("ties", "dare_ties"):
                for who in ("ours", "peft"):
                    spec = {"who": who, "model": model, "layers": args.layers, "strategy": strategy,
                            "weights": weights, "density": density, "folders": folders, "reference": reference}
                    print(row(f"{title}: {who} {strategy}", case(spec)), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
