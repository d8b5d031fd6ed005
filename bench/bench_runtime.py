"""Runtime benchmark against PEFT on the same model and inputs, in one run.

1. Forward throughput (tokens/s) with one LoRA (r=16 on q,k,v,o,gate,up,down) attached to SmolLM2-135M, fp32 and
   nf4: the hub's AdaptedLinear vs PEFT's LoRA layers, timed interleaved on identical inputs; ratio hub/PEFT.
2. Peak memory: in a fresh child process per (base, runtime), the base is loaded and run once, the peak RSS reset
   (/proc/self/clear_refs), then the adapter attached and one forward run; printed is the peak above the warmed base,
   and the bytes of adapter tensors each runtime holds.
3. A mixed batch of 8 rows, each with its own adapter (8 LoRAs): the hub's one-hot row routing (gathered batched
   matmul) vs PEFT's ``adapter_names=`` (a loop over adapters per layer), at prefill and at a one-token decode step.

Outputs are checked equal (max abs diff printed) before anything is timed.

    .venv/bin/python bench/bench_runtime.py [--threads 1] [--repeat 5] [--skip-nf4] [--skip-memory]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from hub.formats import read_adapter  # noqa: E402
from hub.runtime import attach, gate_context, load_base  # noqa: E402
from hub.runtime.pretrained import smollm2_path  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CACHE = ROOT / ".cache"


def make_adapters(base_model: torch.nn.Module, folder: Path, count: int) -> list[Path]:
    folders = []
    for i in range(count):
        out = folder / f"lora{i}"
        if not (out / "adapter_model.safetensors").exists():
            torch.manual_seed(100 + i)
            config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
            get_peft_model(copy.deepcopy(base_model), config).save_pretrained(out)
        folders.append(out)
    return folders


def interleaved(fns: dict[str, callable], repeat: int) -> dict[str, float]:
    """Median seconds per call, alternating the contenders so machine load hits both alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def forward_throughput(base, folder: Path, tokens: torch.Tensor, repeat: int) -> None:
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), folder).eval()
    handle = attach(base.model, read_adapter(folder), name="bench")
    with torch.no_grad():
        diff = (base.model(tokens).logits - peft_model(tokens).logits).abs().max().item()

        def hub_fwd():
            base.model(tokens)

        def peft_fwd():
            peft_model(tokens)

        result = interleaved({"hub": hub_fwd, "peft": peft_fwd}, repeat)
    handle.detach()
    n = tokens.numel()
    label = base.quantize or "fp32"
    print(f"forward {label:5s} B×S={tuple(tokens.shape)}  hub {n / result['hub']:8.0f} tok/s   "
          f"peft {n / result['peft']:8.0f} tok/s   ratio hub/peft {result['peft'] / result['hub']:.2f}x   "
          f"(max |Δlogits| {diff:.1e})")


def mixed_batch(base, folders: list[Path], repeat: int) -> None:
    names = [f"a{i}" for i in range(len(folders))]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), folders[0], adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:], strict=True):
        peft_model.load_adapter(folder, adapter_name=name)
    peft_model.eval()
    handles = [attach(base.model, read_adapter(f), name=n) for n, f in zip(names, folders, strict=True)]
    ctx = gate_context(base.model)
    generator = torch.Generator().manual_seed(0)
    for label, shape in (("prefill", (len(names), 64)), ("decode", (len(names), 1))):
        tokens = torch.randint(0, 49152, shape, generator=generator)
        with torch.no_grad():
            with ctx.rows(names):
                ours = base.model(tokens).logits
            theirs = peft_model(tokens, adapter_names=names).logits
            diff = (ours - theirs).abs().max().item()

            def hub_fwd(tokens=tokens):
                with ctx.rows(names):
                    base.model(tokens)

            def peft_fwd(tokens=tokens):
                peft_model(tokens, adapter_names=names)

            result = interleaved({"hub": hub_fwd, "peft": peft_fwd}, repeat)
        print(f"mixed batch of {len(names)} adapters, {label:7s} B×S={shape}: hub {result['hub'] * 1e3:7.1f} ms   "
              f"peft {result['peft'] * 1e3:7.1f} ms   ratio hub/peft {result['peft'] / result['hub']:.2f}x   "
              f"(max |Δlogits| {diff:.1e})")
    for handle in handles:
        handle.detach()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(runtime: str, quantize: str | None, folder: Path, threads: int) -> None:
    """Load the base, then (peak RSS reset) attach and run one forward; print the peak above the loaded base."""
    torch.set_num_threads(threads)
    base = load_base(smollm2_path(cache_dir=CACHE), quantize=quantize)
    tokens = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base.model(tokens)  # page the weights in and warm the allocator: what follows is the adapter's share
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the current RSS
    loaded = _status("VmRSS")
    if runtime == "hub":
        attach(base.model, read_adapter(folder), name="bench")
        model = base.model
    elif runtime == "peft":
        model = PeftModel.from_pretrained(base.model, folder).eval()
    else:
        model = base.model
    with torch.no_grad():
        model(tokens)
    adapter_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n or ".deltas." in n
    )
    print(json.dumps({"loaded": loaded, "peak": _status("VmHWM"), "adapter_bytes": adapter_bytes}))


def peak_memory(quantizations: list[str | None], folder: Path, threads: int) -> None:
    for quantize in quantizations:
        above, tensors = {}, {}
        for runtime in ("base", "hub", "peft"):
            command = [sys.executable, __file__, "--child", runtime, "--threads", str(threads), "--adapter",
                       str(folder)] + (["--quantize", quantize] if quantize else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            report = json.loads(out.strip().splitlines()[-1])
            above[runtime] = (report["peak"] - report["loaded"]) / 2**20
            loaded = report["loaded"] / 2**20
            tensors[runtime] = report["adapter_bytes"] / 2**20
        print(f"peak RSS above the loaded {quantize or 'fp32'} base ({loaded:.0f} MiB), attach + forward B×S=(4, 64):"
              f" base alone {above['base']:6.1f} MiB   hub {above['hub']:6.1f} MiB   peft {above['peft']:6.1f} MiB"
              f"   adapter share hub {above['hub'] - above['base']:5.1f} MiB"
              f" vs peft {above['peft'] - above['base']:5.1f} MiB;  adapter tensors hub {tensors['hub']:.1f} MiB"
              f" vs peft {tensors['peft']:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-nf4", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-memory", action="store_true")
    parser.add_argument("--child", choices=["base", "hub", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--quantize", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quantize, Path(args.adapter), args.threads)
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeat}")
    if args.only_memory:
        folder = CACHE / "bench-runtime-adapters" / "lora0"
        peak_memory([None] + ([] if args.skip_nf4 else ["nf4"]), folder, args.threads)
        return
    fp32 = load_base(smollm2_path(cache_dir=CACHE))
    folders = make_adapters(fp32.model, CACHE / "bench-runtime-adapters", 8)
    tokens = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(1))
    forward_throughput(fp32, folders[0], tokens, args.repeat)
    mixed_batch(fp32, folders, args.repeat)
    if not args.skip_nf4:
        nf4 = load_base(smollm2_path(cache_dir=CACHE), quantize="nf4")
        forward_throughput(nf4, folders[0], tokens, args.repeat)
        del nf4
    if not args.skip_memory:
        peak_memory([None] + ([] if args.skip_nf4 else ["nf4"]), folders[0], args.threads)


if __name__ == "__main__":
    main()
