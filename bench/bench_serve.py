"""Serving benchmark: `hub serve` under 16 concurrent clients spread over 1, 8 and 32 distinct adapters, against the
loop a PEFT user would write (one PeftModel holding every adapter, ``set_adapter`` per request, one request at a
time behind a lock), on the same base, prompts and token counts.

Each client sends ``--requests`` completions one after the other (greedy, ``--tokens`` tokens each, end of sequence
ignored so every request costs the same), naming adapter (client + k) mod U. Printed per setting: generated
tokens per second over the whole run, and the p50/p95 of request latency (send to last token). The goal: 8 and
32 adapters at 0.9x or more of the one-adapter throughput (rows with different adapters share each forward).

The server runs as `hub serve` in a child process (one torch thread each side: the machine is shared), the PEFT
loop in this process.

    .venv/bin/python bench/bench_serve.py [--model smollm2|tiny] [--quantize nf4|none] [--tokens 32]
                                          [--requests 2] [--adapters 1,8,32] [--skip-peft]
                                          [--mistralrs-python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx2 as httpx  # noqa: E402
from openai import OpenAI  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hub.client import Hub  # noqa: E402
from hub.runtime import load_base  # noqa: E402

CLIENTS = 16
PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "def fibonacci(n):", "My name is",
           "The date today is", "Once upon a time", "The best way to learn is", "Translate to French: cat"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapters(base: Path, folder: Path, count: int) -> list[Path]:
    """``count`` random rank-8 LoRAs on q,k,v,o (small enough to keep the model's text sensible)."""
    model = AutoModelForCausalLM.from_pretrained(base)
    folders = []
    for i in range(count):
        target = folder / f"lora{i}"
        if not (target / "adapter_config.json").is_file():
            torch.manual_seed(i)
            peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                    init_lora_weights=False))
            with torch.no_grad():
                for name, param in peft.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.01)
            peft.save_pretrained(target)
            model = peft.unload()
        folders.append(target)
    return folders


def summary(label: str, latencies: list[float], tokens: int, seconds: float) -> float:
    q = statistics.quantiles(latencies, n=20)
    throughput = tokens / seconds
    print(f"  {label:<34} {throughput:8.1f} tok/s   p50 {statistics.median(latencies):6.2f} s   "
          f"p95 {q[18]:6.2f} s   ({len(latencies)} requests, {seconds:.1f} s)", flush=True)
    return throughput


def run_clients(send, adapters: int, requests: int) -> tuple[list[float], float]:
    """16 closed-loop clients; client c's k-th request names adapter (c + k*16) mod ``adapters``."""
    def client(c: int) -> list[float]:
        out = []
        for k in range(requests):
            started = time.perf_counter()
            send(f"lora{(c + k * CLIENTS) % adapters}", PROMPTS[(c + k) % len(PROMPTS)])
            out.append(time.perf_counter() - started)
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        latencies = [x for part in pool.map(client, range(CLIENTS)) for x in part]
    return latencies, time.perf_counter() - started


def bench_server(base: Path, home: Path, args: argparse.Namespace, counts: list[int]) -> dict[int, float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HUB_HOME": str(home), "OMP_NUM_THREADS": str(args.threads)}
    command = [str(Path(sys.executable).parent / "hub"), "serve", "--base", str(base), "--quantize", args.quantize,
               "--device", "cpu", "--port", str(port), "--served-model-name", "base", "--max-batch", str(CLIENTS),
               "--max-loaded", str(max(counts)), "--json"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("hub serve did not start")
            time.sleep(0.5)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

        def send(model: str, prompt: str, tokens: int = args.tokens) -> None:
            response = client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                                 extra_body={"ignore_eos": True})
            assert response.usage.completion_tokens == tokens

        results = {}
        print(f"hub serve ({args.quantize}, {CLIENTS} clients x {args.requests} requests x {args.tokens} tokens)")
        for count in counts:
            with ThreadPoolExecutor(CLIENTS) as pool:  # warm: every adapter attached once, outside the timing
                list(pool.map(lambda i: send(f"lora{i}", "warm up", 1), range(count)))
            latencies, seconds = run_clients(send, count, args.requests)
            results[count] = summary(f"{count} distinct adapter(s)", latencies, len(latencies) * args.tokens,
                                     seconds)
        return results
    finally:
        server.terminate()
        server.wait(60)


def bench_peft(base: Path, folders: list[Path], args: argparse.Namespace, counts: list[int]) -> None:
    loaded = load_base(base, quantize=None if args.quantize == "none" else args.quantize, device="cpu")
    tokenizer = loaded.tokenizer
    model = PeftModel.from_pretrained(loaded.model, folders[0], adapter_name="lora0").eval()
    for i, folder in enumerate(folders[1:max(counts)], start=1):
        model.load_adapter(folder, adapter_name=f"lora{i}")
    lock = threading.Lock()

    def send(name: str, prompt: str) -> None:
        ids = tokenizer(prompt, return_tensors="pt")
        with lock, torch.no_grad():  # one request at a time: the model is not shared between requests
            model.set_adapter(name)
            out = model.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        assert out.shape[1] - ids.input_ids.shape[1] == args.tokens

    print("PEFT loop (set_adapter per request, one at a time, same clients)")
    for count in counts:
        latencies, seconds = run_clients(send, count, args.requests)
        summary(f"{count} distinct adapter(s)", latencies, len(latencies) * args.tokens, seconds)


def bench_mistralrs(base: Path, folders: list[Path], args: argparse.Namespace, counts: list[int],
                    python: str) -> None:
    """mistral.rs's CPU wheel on the same base, adapters, prompts and token counts, run by ``python`` (a virtualenv
    with ``pip install mistralrs``; it is not a dependency of the hub). Two facts found here: mistral.rs 0.9.5 refuses
    a transformers-5 config.json ("missing field `rope_theta`": transformers 5 writes it under rope_parameters), so
    the peer gets a copy of the folder with rope_theta added; and its Python Runner refuses concurrent calls
    ("Already borrowed"), so requests go one at a time, as the PEFT loop's do."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for file in base.iterdir():
            (folder / file.name).symlink_to(file.resolve())
        config = json.loads((base / "config.json").read_text())
        config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(config))
        script = f"""
import time
from mistralrs import CompletionRequest, LoraAdapter, Runner, Which
folders = {[str(f) for f in folders]!r}
for count in {counts!r}:
    adapters = [LoraAdapter(f"lora{{i}}", folders[i]) for i in range(count)]
    runner = Runner(which=Which.Lora(model_id={str(folder)!r}, adapters=adapters))
    started, latencies, tokens = time.perf_counter(), [], 0
    for i in range(16 * {args.requests}):
        sent = time.perf_counter()
        reply = runner.send_completion_request(CompletionRequest(
            prompt=f"Question {{i}}: what is {{i}} plus {{i}}?", model="default", max_tokens={args.tokens},
            temperature=0.0, ignore_eos=True, adapter=f"lora{{i % count}}"))
        tokens += reply.usage.completion_tokens
        latencies.append(time.perf_counter() - sent)
    seconds = time.perf_counter() - started
    latencies.sort()
    print(f"  {{count}} distinct adapter(s)  {{tokens / seconds:8.1f}} tok/s   per request p50 "
          f"{{latencies[len(latencies) // 2]:6.2f}} s   ({{len(latencies)}} requests, {{seconds:.1f}} s)", flush=True)
"""
        print(f"mistral.rs ({python}; one request at a time, same adapters and token counts)")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAYON_NUM_THREADS": str(args.threads),
               "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run([python, "-c", script], env=env, capture_output=True, text=True, timeout=1800)
        lines = [line for line in done.stdout.splitlines() if "tok/s" in line]
        print("\n".join(lines) if lines else f"  failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--quantize", choices=["nf4", "int8", "none"], default="nf4")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--adapters", default="1,8,32", help="distinct adapter counts to run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (the machine is shared)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--mistralrs-python", default=None,
                        help="a Python with mistralrs installed: also run mistral.rs as a peer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.adapters.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model == "smollm2":
            from hub.runtime.pretrained import smollm2_path

            base = smollm2_path(cache_dir=ROOT / ".cache")
            folders = make_adapters(base, ROOT / ".cache" / "bench-serve-adapters", max(counts))
        else:
            from test_serve import tiny_base

            base = tiny_base(root / "base")
            folders = make_adapters(base, root / "adapters", max(counts))
        hub = Hub(home=root / "home")
        for i, folder in enumerate(folders):
            hub.register(folder, name=f"lora{i}", base=base)
        print(f"{args.model} ({base}), torch {torch.__version__}, {args.threads} thread(s) per process")
        results = bench_server(base, root / "home", args, counts)
        if 1 in results:
            print("  ratio to one adapter: " + ", ".join(f"{c}: {results[c] / results[1]:.2f}x" for c in counts))
        if not args.skip_peft:
            bench_peft(base, folders, args, counts)
        if args.mistralrs_python:
            bench_mistralrs(base, folders, args, counts, args.mistralrs_python)


if __name__ == "__main__":
    main()
