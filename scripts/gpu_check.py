"""CUDA checks for bring-your-own-model: the same adapters, sums, mixtures, evaluation and training on a tiny Llama
loaded by plain transformers on the GPU (fp32, bf16, nf4 through BitsAndBytesConfig), against PEFT on the same GPU
model and against the hub-loaded base on the CPU. Then serving: `hub serve --device cuda` (fp32 and nf4) answering
concurrent requests for two adapters, a per-request weighted composition and the base, each greedy completion
compared token for token with in-process generation on the same GPU. Prints one line per figure; exits 1 when a
figure is over its tolerance, 0 with a plain SKIPPED line when there is no CUDA GPU. ``--device cpu`` runs the same
checks on the CPU (to try the script on a machine without a GPU)."""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# Logit tolerances: fp32 on CUDA vs CPU differs by summation order only; nf4 computes in fp32 after
# dequantizing; bf16 rounds every activation to 8 bits of mantissa.
TOLERANCE = {"fp32": 1e-4, "nf4": 1e-4, "bf16": 1e-2}
TOKENS = torch.tensor([[3, 17, 42, 5, 99, 7, 64, 12], [8, 8, 21, 77, 3, 40, 2, 91]])


def main(device: str = "cuda") -> int:
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: SKIPPED - no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing checked")
        return 0
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from hub.client import Hub
    from hub.composition import activate, compose
    from hub.data import Example
    from hub.evaluate import evaluate
    from hub.runtime import load_base
    from hub.train import Recipe, train

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    atexit.register(shutil.rmtree, root, True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    hub = Hub(home=root / "home")
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"), lora).save_pretrained(root / name)
        hub.register(root / name, name=name, base=root / "base")

    def user(mode: str, device: str):
        if mode == "nf4":
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.float32)
            return AutoModelForCausalLM.from_pretrained(root / "base", quantization_config=bnb,
                                                        device_map={"": device}).eval()
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        return AutoModelForCausalLM.from_pretrained(root / "base", dtype=dtype, device_map={"": device}).eval()

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    def logits(model, attach=None):
        handle = attach(model) if attach else None
        try:
            with torch.no_grad():
                return model(TOKENS.to(model.device)).logits.float().cpu()
        finally:
            if handle is not None:
                handle.detach()

    failures = 0

    def report(what: str, diff: float, tolerance: float) -> None:
        nonlocal failures
        ok = diff <= tolerance
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what:<48} max |diff| {diff:.2e} (tolerance {tolerance:g})")

    examples = [Example(prompt=f"q{i} ", completion=f"answer {i % 3}") for i in range(6)]
    tokenizer = _char_tokenizer()
    for mode in ("fp32", "bf16", "nf4"):
        tol = TOLERANCE[mode]
        gpu = user(mode, device)
        cpu = load_base(root / "base", quantize="nf4" if mode == "nf4" else None, device="cpu",
                        dtype=torch.bfloat16 if mode == "bf16" else torch.float32).model
        handle = activate(gpu, "a", hub=hub)
        print(f"     {mode}: {handle.base_check}")
        on_gpu = logits(gpu)
        handle.detach()
        on_cpu = logits(cpu, lambda model: activate(model, "a", hub=hub))
        report(f"{mode} activate: {device} vs hub-loaded cpu", diff(on_gpu, on_cpu), tol)
        peft = PeftModel.from_pretrained(user(mode, device), root / "a").eval()
        report(f"{mode} activate vs PEFT ({device})", diff(on_gpu, logits(peft)), tol)
        summed = compose(["a", "b"], [0.7, 0.3], hub=hub)
        peft = PeftModel.from_pretrained(user(mode, device), root / "a", adapter_name="a").eval()
        peft.load_adapter(root / "b", adapter_name="b")
        peft.add_weighted_adapter(["a", "b"], [0.7, 0.3], "sum", combination_type="cat")
        peft.set_adapter("sum")
        report(f"{mode} weighted sum vs PEFT cat ({device})", diff(logits(gpu, summed.attach), logits(peft)), tol)
        fits = []
        for model in (gpu, cpu):
            mixture = compose(["a", "b"], kind="mixture", hub=hub)
            fit = mixture.fit(model, tokenizer, examples, steps=3, lr=0.05, batch_size=3, progress=False)
            fits.append((fit.losses, logits(model, mixture.attach)))
        report(f"{mode} mixture fit losses: {device} vs cpu",
               max(abs(x - y) for x, y in zip(fits[0][0], fits[1][0], strict=True)), tol)
        report(f"{mode} fitted mixture logits: {device} vs cpu", diff(fits[0][1], fits[1][1]), tol)
        losses = [evaluate(model, tokenizer, examples, generate=False, progress=False).loss for model in (gpu, cpu)]
        report(f"{mode} evaluate loss: {device} vs cpu", abs(losses[0] - losses[1]), tol)
        recipe = Recipe(steps=3, batch_size=3, lr=2e-2)
        trained = [train(model, tokenizer, examples, recipe, progress=False).losses for model in (gpu, cpu)]
        report(f"{mode} train losses: {device} vs cpu", max(abs(x - y) for x, y in zip(*trained, strict=True)), tol)
    tokenizer.save_pretrained(root / "base")  # the server needs the base's tokenizer
    for quantize in (None, "nf4"):
        mismatches, total = serving(hub, root / "base", device, quantize)
        report(f"serve {quantize or 'fp32'} on {device}: {total - mismatches}/{total} greedy completions equal",
               mismatches, 0)
    where = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"gpu_check: {'all checks passed' if not failures else f'{failures} check(s) FAILED'} on {where}")
    return 1 if failures else 0


def serving(hub, base: Path, device: str, quantize: str | None) -> tuple[int, int]:
    """`hub serve` on ``device`` (uvicorn on a thread, a free 127.0.0.1 port): 8 concurrent greedy requests over
    "a", "b", a weighted [a 0.7, b 0.3] and the base; returns (completions differing from in-process, total)."""
    import socket
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx2 as httpx
    import uvicorn
    from openai import OpenAI

    from hub.composition import activate, compose
    from hub.runtime import load_base
    from hub.server import ServerConfig
    from hub.server.app import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(hub, ServerConfig(base=str(base), quantize=quantize, device=device, served_model_name="base"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health")
                if health.status_code == 200:
                    break
                if health.json()["status"] == "failed":
                    raise SystemExit(f"gpu_check: the server failed to load: {health.json()}")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        cases = [("a", None), ("b", None), ("base", [{"model": "a", "weight": 0.7}, {"model": "b", "weight": 0.3}]),
                 ("base", None)] * 2
        prompts = [f"q{i} answer" for i in range(len(cases))]

        def ask(i: int) -> list[int]:
            model, adapters = cases[i]
            body = {"return_token_ids": True, **({"adapters": adapters} if adapters else {})}
            response = client.completions.create(model=model, prompt=prompts[i], max_tokens=12, temperature=0,
                                                 extra_body=body)
            return list(response.choices[0].model_extra["token_ids"])

        with ThreadPoolExecutor(len(cases)) as pool:
            served = list(pool.map(ask, range(len(cases))))
    finally:
        server.should_exit = True
        thread.join(30)
    loaded = load_base(base, quantize=quantize, device=device)
    mismatches = 0
    for (model, adapters), prompt, tokens in zip(cases, prompts, served, strict=True):
        source = None if model == "base" and not adapters else model
        if adapters:
            source = compose([a["model"] for a in adapters], [a["weight"] for a in adapters], kind="stack", hub=hub)
        handle = activate(loaded.model, source, hub=hub) if source is not None else None
        ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            # The server ends a completion at the generation config's or the tokenizer's end token: so does this.
            eos = sorted({loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id} - {None})
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                        eos_token_id=eos)
        if handle is not None:
            handle.detach()
        mismatches += out[0, ids.shape[1]:].tolist() != tokens
    return mismatches, len(cases)


def _char_tokenizer():
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(string.printable[:95])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


if __name__ == "__main__":
    sys.exit(main(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"))
