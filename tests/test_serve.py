"""`hub serve` on a tiny Llama, through the real OpenAI client: models, mixed batches over many adapters equal to
in-process generation, streaming, disconnects, errors, the queue bound, API keys, vLLM's adapter routes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch
from conftest import tiny_llama_config
from openai import OpenAI

from hub.client import Hub

WORDS = ["the", "a", "date", "name", "is", "was", "on", "in", "of", "and", "user", "assistant", "system", ":",
         "hello", "world", "what", "when", "who", "answer", "question", "yes", "no", "today", "tomorrow"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
PROMPTS = ["the date is", "what name was on the", "hello world", "who is the answer", "when was today",
           "a question of date", "yes and no", "the name of the world"]


# ---------------------------------------------------------------------------------------------------------------
# A tiny base with a tokenizer, adapters registered on it, a server on a free port (used by test_serve_* too)


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over the tiny model's whole vocabulary (128), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS + [f"w{i}" for i in range(128)]:
        if len(vocab) < 128:
            vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_base(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama saved with its tokenizer (end of sequence: token 1)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(eos_token_id=1, bos_token_id=0, pad_token_id=0))
    model.generation_config.eos_token_id = 1
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def register_adapters(hub: Hub, base: Path, root: Path, count: int = 8) -> list[str]:
    """``count`` LoRAs (one rsLoRA, one IA3 among them) registered as a0..a{count-1}, strong enough to change the
    model's output; plus a merged sum, a stack and a fitted-looking mixture (random gate) of the first three."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from hub.composition import compose

    names = []
    for i in range(count):
        torch.manual_seed(100 + i)
        if i == count - 1:
            config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                               init_ia3_weights=False)
        else:
            config = LoraConfig(r=4 + 2 * (i % 3), lora_alpha=8, use_rslora=i == 1, init_lora_weights=False,
                                target_modules=["q_proj", "v_proj", "down_proj"])
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base), config)
        with torch.no_grad():  # larger deltas than PEFT's random init: each adapter visibly changes greedy output
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        model.save_pretrained(root / f"a{i}")
        hub.register(root / f"a{i}", name=f"a{i}", base=base)
        names.append(f"a{i}")
    hub.alias("a0@1", "prod")
    compose(names[:2], [0.6, 0.4], hub=hub).register(hub, name="merged")
    compose(names[:3], [1.0, 0.5, 0.8], kind="stack", hub=hub).register(hub, name="stacked")
    mixture = compose(names[:3], kind="mixture", hub=hub)
    mixture.bind(LlamaForCausalLM.from_pretrained(base))
    torch.manual_seed(7)
    with torch.no_grad():
        mixture.module.weight.normal_(0, 3.0)
    mixture.register(hub, name="mix")
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """``hub.server.app.create_app`` under uvicorn on a thread, listening on a free 127.0.0.1 port."""

    def __init__(self, hub: Hub, **options: Any):
        import uvicorn

        from hub.server import ServerConfig
        from hub.server.app import create_app

        self.config = ServerConfig(**options)
        self.app = create_app(hub, self.config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_healthy(self.url)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **options: Any) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=options.pop("api_key", "unused"), max_retries=0,
                      timeout=120, **options)

    def metric(self, name: str) -> float:
        """A metric's value (summed over its labels) from /metrics."""
        text = httpx.get(f"{self.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {")


def wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{url}/health", timeout=5)
            if response.status_code == 200:
                return
            if response.json().get("status") == "failed":
                raise AssertionError(f"the server failed to start: {response.json()}")
        time.sleep(0.2)
    raise AssertionError(f"{url} did not become healthy in {timeout} s")


def reference(model: Any, hub: Hub, source: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens in-process, with ``source`` (a reference, a composition or None) attached alone."""
    from hub.composition import activate

    handle = activate(model, source, hub=hub) if source is not None else None
    try:
        with torch.no_grad():
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False)
        return out[0, len(prompt):].tolist()
    finally:
        if handle is not None:
            handle.detach()


def token_ids(choice: Any) -> list[int]:
    return list(choice.model_extra["token_ids"])


def complete(client: OpenAI, model: str, prompt: str, *, stream: bool, max_tokens: int = 12,
             **extra: Any) -> tuple[str, list[int], str]:
    """(text, token ids, finish reason) of one greedy completion, streamed or whole."""
    body = {"return_token_ids": True, **extra}
    if not stream:
        response = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             extra_body=body)
        choice = response.choices[0]
        assert response.usage.completion_tokens == len(token_ids(choice))
        return choice.text, token_ids(choice), choice.finish_reason
    text, ids, finish = "", [], None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body=body):
        for choice in chunk.choices:
            text += choice.text
            ids += choice.model_extra.get("token_ids") or []
            finish = choice.finish_reason or finish
    return text, ids, finish


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    from hub.runtime import load_base

    root = tmp_path_factory.mktemp("serve")
    base = tiny_base(root / "base")
    hub = Hub(home=root / "home")
    names = register_adapters(hub, base, root)
    other = tiny_base(root / "other-base", seed=1)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    get_peft_model(LlamaForCausalLM.from_pretrained(other), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(root / "foreign")
    hub.register(root / "foreign", name="foreign", base=other)
    sequence = hub.compose(names[:3], kind="mixture", router={"routing": "sequence"})
    sequence.bind(LlamaForCausalLM.from_pretrained(base))
    torch.manual_seed(8)
    with torch.no_grad():  # a gate that differs between prompts: routing per sequence then differs from per token
        sequence.module.weight.normal_(0, 3.0)
    sequence.register(hub, name="mix-seq")
    loaded = load_base(base, quantize=None, device="cpu")
    return {"root": root, "base": base, "hub": hub, "names": names, "model": loaded.model,
            "tokenizer": loaded.tokenizer}


@pytest.fixture(scope="module")
def server(setup: dict[str, Any]) -> Iterator[ServerThread]:
    with ServerThread(setup["hub"], base=str(setup["base"]), served_model_name="tiny", quantize=None,
                      device="cpu", max_loaded=12, max_batch=16, allow_adapter_paths=True) as running:
        yield running


# ---------------------------------------------------------------------------------------------------------------
# Tests


def test_models_lists_the_base_and_every_version_on_it(server: ServerThread, setup: dict[str, Any]) -> None:
    models = {m.id: m for m in server.client().models.list().data}
    assert {"tiny", "a0", "a0@1", "a0@prod", "merged@1", "stacked", "mix", "mix@1"} <= set(models)
    assert "foreign" not in models and "foreign@1" not in models  # registered on another base
    assert models["tiny"].model_extra["parent"] is None
    assert all(m.model_extra["parent"] == "tiny" for key, m in models.items() if key != "tiny")
    assert models["mix"].model_extra["method"] == "mixture"


def test_concurrent_requests_over_many_adapters_equal_in_process_generation(server: ServerThread,
                                                                            setup: dict[str, Any]) -> None:
    """16 requests at once, half streaming: 8 adapters, a merged sum, a stack, a mixture (routed per token, and one
    per sequence), a per-request weighted composition and the bare base. Each greedy completion is token for token
    what the model gives in-process with that adapter attached alone."""
    from hub.composition import compose

    hub, tokenizer, names = setup["hub"], setup["tokenizer"], setup["names"]
    weighted = [{"model": "a3", "weight": 0.7}, {"model": "a4", "weight": 0.3}]
    cases = [(name, None) for name in names] + [("merged", None), ("stacked", None), ("mix", None),
                                                 ("tiny", weighted), ("tiny", None), ("a0@prod", None),
                                                 ("mix@1", None), ("mix-seq", None)]
    assert len(cases) == 16
    before = server.metric("hub_batch_occupancy_rows_count")
    client = server.client()

    def ask(index: int) -> tuple[str, list[int], str]:
        model, adapters = cases[index]
        extra = {"adapters": adapters} if adapters else {}
        return complete(client, model, PROMPTS[index % len(PROMPTS)], stream=index % 2 == 1, max_tokens=16, **extra)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for index, ((model, adapters), (text, ids, finish)) in enumerate(zip(cases, answers, strict=True)):
        prompt = tokenizer(PROMPTS[index % len(PROMPTS)]).input_ids
        source = None if model == "tiny" and adapters is None else model
        if adapters:
            source = compose([a["model"] for a in adapters], [a["weight"] for a in adapters], kind="stack", hub=hub)
        expected = reference(setup["model"], hub, source, prompt, 16)
        assert ids == expected, f"request {index} ({model}, {'stream' if index % 2 else 'whole'})"
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        assert finish == ("stop" if expected[-1] == 1 else "length")
    outputs = {tuple(ids) for _, ids, _ in answers}
    assert len(outputs) >= 10, "the adapters should change the output"
    # They were decoded together: some forwards carried several rows.
    steps = server.metric("hub_batch_occupancy_rows_count") - before
    rows = server.metric("hub_batch_occupancy_rows_sum")
    assert steps > 0 and rows / steps > 1.5


def test_chat_completions_use_the_base_chat_template(server: ServerThread, setup: dict[str, Any]) -> None:
    tokenizer = setup["tokenizer"]
    messages = [{"role": "system", "content": "yes"}, {"role": "user", "content": "what date is today"}]
    response = server.client().chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0,
                                                       extra_body={"return_token_ids": True})
    prompt = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False).input_ids
    assert response.model_extra["prompt_token_ids"] == prompt
    expected = reference(setup["model"], setup["hub"], "a2", prompt, 10)
    assert token_ids(response.choices[0]) == expected
    assert response.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert response.usage.prompt_tokens == len(prompt)
    chunks = list(server.client().chat.completions.create(model="a2", messages=messages, max_tokens=10,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        response.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)


def test_sampling_with_a_seed_repeats_and_stop_strings_cut_the_text(server: ServerThread) -> None:
    client = server.client()
    sampled = [client.completions.create(model="a1", prompt="hello world", max_tokens=12, temperature=1.0,
                                         top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    text, _, _ = complete(client, "a1", "hello world", stream=False, max_tokens=12)
    # A temperature too small to divide the logits by (they would overflow to inf) samples greedily.
    assert client.completions.create(model="a1", prompt="hello world", max_tokens=12, temperature=1e-45,
                                     seed=7).choices[0].text == text
    words = text.split()
    stop = words[len(words) // 2]
    for stream in (False, True):
        cut, _, finish = complete(client, "a1", "hello world", stream=stream, max_tokens=12, stop=[stop])
        assert finish == "stop" and cut == text[: text.index(stop)]


def test_a_client_that_disconnects_mid_stream_frees_its_row(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream(
            "POST", "/v1/completions", json={"model": "a1", "prompt": "the date is", "max_tokens": 120,
                                             "temperature": 0, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # The others are served meanwhile and after.
    text, ids, _ = complete(server.client(), "a2", "hello world", stream=True)
    assert ids
    deadline = time.monotonic() + 10
    while server.metric("hub_running_sequences") > 0:
        assert time.monotonic() < deadline, "the disconnected request's row was not freed"
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model": "nope", "prompt": "hello"}, 404, "does not exist"),
    ({"model": "nope@3", "prompt": "hello"}, 404, "does not exist"),
    ({"model": "a0", "prompt": "hello", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "a0", "prompt": "hello", "temperature": 3}, 400, "temperature"),
    ({"model": "a0", "prompt": "hello", "n": 2}, 400, "n"),
    ({"model": "foreign", "prompt": "hello"}, 400, "adapter for base"),
    ({"model": "a0", "prompt": "hello " * 120, "max_tokens": 20}, 400, "maximum context length"),
    ({"model": "a0", "prompt": "hello " * 130}, 400, "maximum context length is 128 tokens; the prompt alone has 130"),
    ({"model": "a0", "prompt": "hello", "seed": 2**70, "temperature": 1}, 400, "seed"),
    ({"model": "a0", "prompt": [5, 999]}, 400, "token ids"),
    ({"model": "tiny", "prompt": "hi", "adapters": [{"model": "mix", "weight": 1}]}, 400, "mixture"),
    ({"model": "tiny", "prompt": "hi", "adapters": [{"model": "a0", "weight": 1e308}]}, 400, "adapters.0.weight"),
    ({"model": "tiny", "prompt": "hi", "adapters": [{"model": "a0", "weight": 3e38}, {"model": "a1", "weight": 3e38}]},
     400, "not finite"),
    ({"model": "a0", "prompt": "hi", "adapters": [{"model": "a1"}]}, 400, "must name the base"),
    ({"model": "a0@", "prompt": "hello"}, 400, ""),
    ({"prompt": "hello"}, 400, "model"),
])
def test_bad_requests_get_openai_errors_and_leave_the_server_healthy(server: ServerThread, body: dict[str, Any],
                                                                      status: int, needle: str) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"]
    assert "Traceback" not in response.text
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_malformed_json_and_unknown_routes(server: ServerThread) -> None:
    response = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=10,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"] == "the request body is not valid JSON"
    assert response.json()["error"]["param"] is None
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["type"] == "invalid_request_error"
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        server.client().completions.create(model="nope", prompt="x", max_tokens=2)


def test_the_registry_pages_are_served_beside_the_api(server: ServerThread, setup: dict[str, Any]) -> None:
    home = httpx.get(f"{server.url}/ui/", timeout=10)
    assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")
    assert "a0" in httpx.get(f"{server.url}/ui/adapters/a0", timeout=10).text
    # The API keeps its own error format; the pages keep theirs.
    assert httpx.get(f"{server.url}/v1/nothing", timeout=10).json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/ui/adapters/nope", timeout=10).status_code == 404
    # Routing errors under /ui are pages too, not the API's JSON: no route at all (404), a form's route (405).
    for path, status in (("/ui/no/such/page", 404), ("/ui/adapters/a0/1/extra", 405)):
        page = httpx.get(f"{server.url}{path}", timeout=10)
        assert page.status_code == status and page.headers["content-type"].startswith("text/html"), path


def test_an_unexpected_error_is_one_log_line_and_keeps_the_connection(server: ServerThread,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("no handler knows this")

    server.app.add_api_route("/v1/test-unexpected", boom)  # a fault no handler foresaw, as a route
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client, caplog.at_level(logging.ERROR):
            failed = client.get("/v1/test-unexpected")
            assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
            assert "no handler knows" not in failed.text  # details stay in the log
            assert client.get("/v1/models").status_code == 200  # the same kept-alive connection still serves
    finally:
        server.app.router.routes.pop()
    assert "RuntimeError: no handler knows this" in caplog.text and "Traceback" not in caplog.text


def test_load_and_unload_lora_adapter_like_vllm(server: ServerThread, setup: dict[str, Any]) -> None:
    load = httpx.post(f"{server.url}/v1/load_lora_adapter",
                      json={"lora_name": "local-a6", "lora_path": str(setup["root"] / "a6")}, timeout=60)
    assert load.status_code == 200, load.text
    assert "local-a6" in {m.id for m in server.client().models.list().data}
    prompt = setup["tokenizer"]("the date is").input_ids
    _, ids, _ = complete(server.client(), "local-a6", "the date is", stream=False)
    assert ids == reference(setup["model"], setup["hub"], "a6", prompt, 12)
    assert httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "a3@1"}).status_code == 200
    # A name already served is refused, as vLLM does (replacing it would keep the first adapter attached for good).
    for body in ({"lora_name": "local-a6", "lora_path": "a4"}, {"lora_name": "tiny", "lora_path": "a4"}):
        taken = httpx.post(f"{server.url}/v1/load_lora_adapter", json=body)
        assert taken.status_code == 400 and "unload it first" in taken.json()["error"]["message"]
    _, ids, _ = complete(server.client(), "local-a6", "the date is", stream=False)
    assert ids == reference(setup["model"], setup["hub"], "a6", prompt, 12)
    for name in ("local-a6", "a3@1"):
        assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    again = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "local-a6"})
    assert again.status_code == 404 and "was not loaded" in again.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "nope"}).status_code == 404


def test_a_version_whose_file_is_missing_here_is_fetched_from_its_remote(
        server: ServerThread, setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A teammate's version (shared registry, file not in this machine's store): the server fetches it from the
    Hub repository it was pushed to, verified by digest, on first use."""
    from hubserver import HubServer
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hub, root = setup["hub"], setup["root"]
    torch.manual_seed(11)
    get_peft_model(LlamaForCausalLM.from_pretrained(setup["base"]), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(root / "teammate")
    digest = hub.register(root / "teammate", name="teammate", base=setup["base"]).version.digest
    prompt = setup["tokenizer"]("the date is").input_ids
    expected = reference(setup["model"], hub, "teammate", prompt, 12)
    with HubServer(tokens={"hf_serve_token": "team"}) as remote:
        monkeypatch.setenv("HF_ENDPOINT", remote.url)
        monkeypatch.setenv("HF_TOKEN", "hf_serve_token")
        hub.push("teammate@1", "team/teammate")
        hub.store.remove(digest)
        assert digest not in hub.store
        _, ids, _ = complete(server.client(), "teammate", "the date is", stream=False)
    assert ids == expected and digest in hub.store


def test_the_adapter_cache_holds_at_most_max_loaded_and_waits_for_room(setup: dict[str, Any]) -> None:
    """--max-loaded 2 under 8 concurrent requests over 4 adapters: the least recently used idle adapter makes room,
    a request whose adapter finds no idle slot waits for a running row (nothing is detached under a row), and every
    answer still equals in-process generation; a version needing more adapters than that is refused."""
    cases = [(f"a{1 + i % 4}", PROMPTS[i]) for i in range(8)]
    with ServerThread(setup["hub"], base=str(setup["base"]), served_model_name="tiny", quantize=None, device="cpu",
                      max_loaded=2, max_batch=4) as small:
        client = small.client()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda case: complete(client, case[0], case[1], stream=False)[1], cases))
        stacked = httpx.post(f"{small.url}/v1/completions", json={"model": "stacked", "prompt": "hi"}, timeout=60)
        metrics = httpx.get(f"{small.url}/metrics").text
    assert stacked.status_code == 400 and "needs 3 adapters at once" in stacked.json()["error"]["message"]
    assert 'hub_loaded_adapters 2.0' in metrics
    evictions = [line for line in metrics.splitlines() if line.startswith('hub_adapter_cache_total{result="eviction"}')]
    assert evictions and float(evictions[0].split()[-1]) >= 2
    for (model, prompt), ids in zip(cases, answers, strict=True):
        assert ids == reference(setup["model"], setup["hub"], model, setup["tokenizer"](prompt).input_ids, 12), model


def test_metrics_count_requests_tokens_and_cache(server: ServerThread) -> None:
    complete(server.client(), "a0", "hello world", stream=False, max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("hub_requests_total", "hub_generation_tokens_total", "hub_prompt_tokens_total", "hub_queue_depth",
                 "hub_batch_occupancy_rows_bucket", 'hub_adapter_cache_total{result="hit"}',
                 "hub_request_latency_seconds_bucket", "hub_time_to_first_token_seconds_bucket",
                 "hub_loaded_adapters"):
        assert name in text, name


def test_a_flood_beyond_the_queue_gets_429_and_the_api_key_is_enforced(setup: dict[str, Any],
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-test-0123456789abcdef"
    with ServerThread(setup["hub"], base=str(setup["base"]), quantize=None, device="cpu", max_batch=1, max_queue=2,
                      api_key=key) as small:
        assert httpx.get(f"{small.url}/v1/models").status_code == 401
        wrong = httpx.get(f"{small.url}/v1/models", headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{small.url}/health").status_code == 200  # health and metrics need no key
        refused = httpx.post(f"{small.url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {key}"},
                             json={"lora_name": "x", "lora_path": str(setup["root"] / "a6")})
        assert refused.status_code == 400 and "--allow-adapter-paths" in refused.json()["error"]["message"]
        # A client that sends the key where the server echoes input (an unknown model) never gets it back.
        echoed = httpx.post(f"{small.url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": f"nope-{key}", "prompt": "x", "max_tokens": 1})
        assert echoed.status_code == 404 and key not in echoed.text

        def ask(_: int) -> int:
            response = httpx.post(f"{small.url}/v1/completions", timeout=120,
                                  headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "a0", "prompt": "the date is", "max_tokens": 100,
                                        "temperature": 1.0, "seed": 1})
            if response.status_code == 429:
                assert response.headers["Retry-After"] == "1"
                assert response.json()["error"]["code"] == "queue_full"
            return response.status_code

        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(ask, range(12)))
        assert statuses.count(429) >= 1 and statuses.count(200) >= 3, statuses
        assert set(statuses) <= {200, 429}
        assert small.client(api_key=key).completions.create(model="a0", prompt="hello", max_tokens=2).choices
    assert key not in caplog.text


def test_hub_serve_command_serves_and_shuts_down_gracefully(setup: dict[str, Any]) -> None:
    """The installed command: a request running when SIGTERM arrives still completes, then the process ends
    (uvicorn re-raises the signal after its clean shutdown, so the status says SIGTERM)."""
    port = free_port()
    env = {**os.environ, "HUB_HOME": str(setup["root"] / "home"), "HUB_API_KEY": "", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "hub"), "serve", "--base", str(setup["base"]), "--quantize",
               "none", "--device", "cpu", "--port", str(port), "--served-model-name", "tiny", "--json"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="a1", prompt="the date is", max_tokens=60, temperature=1.0,
                                           seed=3, stream=True)
        first = next(iter(stream))
        process.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert first.choices and rest[-1].choices[0].finish_reason in ("stop", "length")
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    logs = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    assert any("serving" in entry["message"] for entry in logs)
    assert any("Finished server process" in entry["message"] for entry in logs)
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in logs)


def test_the_demo_serving_step_answers_through_hub_serve(setup: dict[str, Any]) -> None:
    """scripts/demo.py's last step, on the tiny model: an adapter, a weighted composition and the mixture."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from demo import serve_and_ask

    from hub.data import Example

    asks = [("adapter a0", "a0", None, Example("the date is", "")),
            ("weighted", "base", [{"model": "a1", "weight": 0.5}, {"model": "a2", "weight": 0.5}],
             Example("hello world", "")),
            ("mixture", "mix", None, Example("what name", ""))]
    answers = serve_and_ask(setup["hub"], setup["base"], asks, quantize="none")
    assert [label.split(" (")[0] for label, _ in answers] == ["adapter a0", "weighted", "mixture"]
    assert all(isinstance(text, str) for _, text in answers)
