"""The HTTP edge: a FastAPI application with OpenAI's routes, vLLM's adapter routes, /health and /metrics.

The model loads in the background when the application starts: until it is ready, /health and every model route
answer 503. Errors leave as OpenAI's error JSON with the status the error calls for (``STATUS``), never with a
traceback; an unexpected one is logged once with its request id and model, and answered 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from hub.errors import Conflict, HubError, Incompatible, InvalidArtifact, NotFound, QueryError
from hub.server.config import ServerConfig
from hub.server.errors import InvalidRequest, NotReady, Overloaded, Unauthorized
from hub.server.metrics import Metrics
from hub.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    SamplingRequest,
    UnloadLoraAdapterRequest,
    completion_body,
    error_body,
    usage,
)
from hub.server.scheduler import Failed, Finished, SamplingParams, Sequence, Token
from hub.server.text import TextStream

if TYPE_CHECKING:
    from hub.client import Hub
    from hub.server.plans import Plan

log = logging.getLogger("hub.server")

# HubError class → (HTTP status, OpenAI error type, code). The first class a raised error is an instance of wins.
STATUS: list[tuple[type[HubError], int, str, str | None]] = [
    (Unauthorized, 401, "authentication_error", "invalid_api_key"),
    (NotFound, 404, "invalid_request_error", "model_not_found"),
    (Overloaded, 429, "rate_limit_error", "queue_full"),
    (NotReady, 503, "server_error", "not_ready"),
    (Conflict, 409, "invalid_request_error", "conflict"),
    (InvalidRequest, 400, "invalid_request_error", None),
    (Incompatible, 400, "invalid_request_error", "model_incompatible"),
    (InvalidArtifact, 400, "invalid_request_error", "invalid_adapter"),
    (QueryError, 400, "invalid_request_error", "invalid_reference"),
    (HubError, 500, "server_error", None),  # a store or database failure: not the client's doing
]
# How often a request waiting for its next token checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection": only the metrics and log see it


def error_response(exc: HubError) -> JSONResponse:
    status, kind, code = next((s, k, c) for cls, s, k, c in STATUS if isinstance(exc, cls))
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
    if isinstance(exc, NotReady):
        headers = {"Retry-After": "5"}
    return JSONResponse(error_body(str(exc), kind=kind, code=code), status_code=status, headers=headers)


class Engine:
    """The served model once loaded, and what serves it: adapter cache, resolver, scheduler."""

    def __init__(self, hub: Hub, config: ServerConfig, metrics: Metrics):
        self.hub, self.config, self.metrics = hub, config, metrics
        self.state = "loading"  # → ready | failed, then stopping
        self.problem: str | None = None
        self.started = int(time.time())
        self.local: dict[str, Plan] = {}  # lora_name → plan, for adapters loaded through /v1/load_lora_adapter

    def load(self) -> None:
        """Load the base and start the scheduler (on a background thread: the server answers 503 meanwhile)."""
        from hub.server.plans import AdapterCache, Resolver
        from hub.server.scheduler import Scheduler

        try:
            base = self.hub.load_base(self.config.base, quantize=self.config.quantize, device=self.config.device)
            from hub.runtime import place

            self.tokenizer, self.base = base.tokenizer, base
            self.device = place(base.model)
            self.max_model_len = self.config.max_model_len or _context_length(base.model, base.tokenizer)
            self.cache = AdapterCache(base.model, self.hub, self.config.max_loaded, self.metrics)
            self.resolver = Resolver(self.hub, base.fingerprint, self.config.model_id, self.cache)
            self.scheduler = Scheduler(base.model, self.cache, self.metrics, device=self.device,
                                       eos_ids=_eos_ids(base.model, base.tokenizer), max_batch=self.config.max_batch,
                                       max_queue=self.config.max_queue)
            self.scheduler.start()
        except Exception as exc:
            self.state, self.problem = "failed", f"{type(exc).__name__}: {exc}" if not isinstance(exc, HubError) \
                else str(exc)
            log.error("cannot serve %s: %s", self.config.base, self.problem)
            return
        self.state = "ready"
        log.info("serving %s as %r on %s (%s)", base.path, self.config.model_id, self.device,
                 self.config.quantize or "unquantized")

    def check_new_name(self, name: str) -> None:
        """Refuse a /v1/load_lora_adapter name already served by a load or as the base (as vLLM does: replacing it
        would leave the first load's adapters attached for good). Raises InvalidRequest."""
        if name in self.local or name == self.config.model_id:
            what = "the served base" if name == self.config.model_id else "already loaded"
            raise InvalidRequest(f"the LoRA adapter {name!r} is {what}: unload it first, or choose another lora_name")

    def ready(self) -> Engine:
        if self.state != "ready":
            reason = {"loading": "the model is still loading", "stopping": "the server is shutting down"}.get(
                self.state, f"the model failed to load ({self.problem})")
            raise NotReady(reason)
        return self

    def stop(self) -> None:
        if self.state == "ready":
            self.state = "stopping"
            self.scheduler.stop(self.config.shutdown_timeout)

    # -- requests ------------------------------------------------------------------------------------------------
    def plan(self, body: SamplingRequest) -> Plan:
        """What the request runs (a worker thread: the registry and store are read here)."""
        if body.adapters is None and body.model in self.local:
            return self.local[body.model]
        adapters = [(a.model, a.weight) for a in body.adapters] if body.adapters else None
        return self.resolver.plan(body.model, adapters)

    def prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        if isinstance(body, CompletionRequest):
            if isinstance(body.prompt, list):
                vocab = len(self.tokenizer)
                if any(not 0 <= t < vocab for t in body.prompt):
                    raise InvalidRequest(f"prompt token ids must be from 0 to {vocab - 1}")
                return list(body.prompt)
            return self.tokenizer(body.prompt).input_ids
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(f"the base {self.config.model_id!r} has no chat template: use /v1/completions")
        messages = [m.as_template_input() for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (alternating roles, ...) raise jinja errors
            raise InvalidRequest(f"the chat template refused these messages: {exc}") from None
        # The template writes the special tokens it wants (a BOS, role markers): none are added again.
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def sampling(self, body: SamplingRequest, prompt_tokens: int) -> SamplingParams:
        limit = self.max_model_len
        max_tokens = body.max_tokens
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if prompt_tokens >= limit:
            raise InvalidRequest(f"this model's maximum context length is {limit} tokens; the prompt alone has "
                                 f"{prompt_tokens}")
        if max_tokens is None:
            max_tokens = limit - prompt_tokens
        if prompt_tokens + max_tokens > limit:
            raise InvalidRequest(f"this model's maximum context length is {limit} tokens; the request has "
                                 f"{prompt_tokens} prompt tokens and asks for {max_tokens} more")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                              ignore_eos=body.ignore_eos)

    def models(self) -> list[dict[str, Any]]:
        """The base and every version registered on it: by name (its latest), name@N and name@alias."""
        entries = [{"id": self.config.model_id, "object": "model", "created": self.started,
                    "owned_by": "adapter-hub", "root": str(self.base.path), "parent": None}]
        seen = {self.config.model_id}
        latest: dict[str, Any] = {}
        from hub.client import Query

        versions, after = [], None
        while True:  # every page: a server lists what it serves
            page = self.hub.compatible(self.base.path, Query(after=after))
            versions += [m.version for m in page if m.exact]
            after = page.next_after
            if after is None:
                break
        for version in versions:
            if version.name not in latest or version.number > latest[version.name].number:
                latest[version.name] = version
        for version in versions:
            ids = [f"{version.name}@{version.number}", *(f"{version.name}@{a}" for a in version.aliases)]
            if latest[version.name] is version:
                ids.insert(0, version.name)
            for model_id in ids:
                if model_id not in seen:
                    seen.add(model_id)
                    entries.append({"id": model_id, "object": "model", "created": int(version.created.timestamp()),
                                    "owned_by": "adapter-hub", "root": f"{version.name}@{version.number}",
                                    "parent": self.config.model_id, "method": version.method})
        for name in self.local:
            if name not in seen:
                entries.append({"id": name, "object": "model", "created": self.started, "owned_by": "adapter-hub",
                                "root": name, "parent": self.config.model_id})
        return entries


class Run:
    """One request in flight, seen from the event loop: its events arrive on an asyncio queue."""

    def __init__(self, engine: Engine, request_id: str, plan: Plan, prompt: list[int], params: SamplingParams,
                 stop: list[str]):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine, self.request_id, self.prompt = engine, request_id, prompt
        self.text = TextStream(engine.tokenizer, stop)
        self.sequence = Sequence(request_id, plan, prompt, params,
                                 lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event))
        self.started = time.monotonic()
        self._pending: asyncio.Future | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.text.tokens)

    def cancel(self) -> None:
        """Free the row (harmless once it has finished)."""
        self.sequence.cancel()
        self.engine.scheduler.wake()

    async def next(self, request: Request | None = None) -> tuple[str, list[int], str | None] | None:
        """The next piece of text, its token ids and, at the end, the finish reason; None when ``request``'s
        client disconnected meanwhile (the row is freed). Raises the request's error."""
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._pending}, timeout=DISCONNECT_POLL_SECONDS if request else None)
            if done:
                event, self._pending = self._pending.result(), None
                return self._piece(event)
            if await request.is_disconnected():
                log.info("request %s: client disconnected", self.request_id)
                self.cancel()
                return None

    def _piece(self, event: Token | Finished | Failed) -> tuple[str, list[int], str | None]:
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Finished):
            return self.text.finish(), [], "stop" if self.text.stopped else event.reason
        text = self.text.push(event.id)
        if self.text.stopped:  # a stop string: the scheduler frees the row at its next step
            self.cancel()
            return text, [event.id], "stop"
        return text, [event.id], None


def create_app(hub: Hub, config: ServerConfig) -> FastAPI:
    """The application serving ``config.base`` from ``hub``'s registry (the model loads when it starts)."""
    metrics = Metrics()
    engine = Engine(hub, config, metrics)
    if config.api_key:
        from hub.secrets import remember

        remember(config.api_key)  # scrubbed from anything the hub logs

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=engine.load, name="hub-load", daemon=True).start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="adapter hub", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    # The registry's pages beside the API, in the same process (writes from the pages need the same key).
    from hub.web import mount
    from hub.web.app import error_page, http_error_page

    mount(app, hub, api_key=config.api_key, prefix="/ui")

    def authorized(request: Request) -> None:
        if not config.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise Unauthorized("a valid API key is required: Authorization: Bearer <key>")

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        try:
            response = await call_next(request)
        except Exception as exc:  # caught here, not by an exception handler, so that Starlette
            # neither logs a traceback nor closes the client's kept-alive connection after the 500
            response = unexpected(request, exc)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError) -> JSONResponse:
        response = error_response(exc)
        if response.status_code == 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(_describe(exc), kind="invalid_request_error", param=_param(exc)),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path == "/ui" or request.url.path.startswith("/ui/"):  # a person at a browser: a page
            return http_error_page(request, exc)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind=kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def unexpected(request: Request, exc: Exception) -> Response:
        """What no handler knew: one log line with the request and the error (scrubbed), a 500 to the client."""
        log.error("%s %s failed unexpectedly: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        if request.url.path == "/ui" or request.url.path.startswith("/ui/"):
            return error_page(request, 500, "Internal error", "the page failed; the server log has details")
        return JSONResponse(error_body("internal error; the server log has the details", kind="server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 200 if engine.state == "ready" else 503
        body = {"status": engine.state}
        if engine.problem:
            body["problem"] = engine.problem
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(engine.ready().models)}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(body, request, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(body, request, chat=True)

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorized)])
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
        ready = engine.ready()
        ready.check_new_name(body.lora_name)
        plan = await run_in_threadpool(_plan_for_load, ready, body)
        await asyncio.wrap_future(ready.scheduler.call(lambda: ready.cache.pin(plan)))
        try:
            ready.check_new_name(body.lora_name)  # a concurrent load of the same name may have won meanwhile
        except InvalidRequest:
            ready.scheduler.call(lambda: ready.cache.release(plan))
            raise
        ready.local[body.lora_name] = plan
        log.info("loaded adapter %r (%s)", body.lora_name, body.lora_path or body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorized)])
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
        ready = engine.ready()
        plan = ready.local.pop(body.lora_name, None)
        if plan is None:
            raise NotFound(f"the LoRA adapter {body.lora_name!r} was not loaded")
        await asyncio.wrap_future(ready.scheduler.call(lambda: ready.cache.release(plan)))
        log.info("unloaded adapter %r", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def generate(body: CompletionRequest | ChatCompletionRequest, request: Request, *, chat: bool) -> Response:
        ready = engine.ready()
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        prompt = ready.prompt_ids(body)
        params = ready.sampling(body, len(prompt))
        stop = body.stop_strings()
        plan = await run_in_threadpool(ready.plan, body)
        run = Run(ready, request_id, plan, prompt, params, stop)
        ready.scheduler.submit(run.sequence)
        log.info("request %s: model %s, %d prompt tokens, max_tokens %d, %s", request_id, body.model, len(prompt),
                 params.max_tokens, "streaming" if body.stream else "whole")
        route = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            # Wait for the first token before answering: an adapter that fails to attach is still a proper error.
            first = await run.next(request)
        except BaseException:
            run.cancel()
            raise
        if first is None:
            return Response(status_code=CLIENT_CLOSED)
        if body.stream:
            return StreamingResponse(stream(run, body, first, chat=chat, route=route), media_type="text/event-stream")
        return await whole(run, body, first, request, chat=chat, route=route)

    async def whole(run: Run, body: SamplingRequest, first: tuple[str, list[int], str | None], request: Request, *,
                    chat: bool, route: str) -> JSONResponse:
        text, ids, finish = first
        pieces, token_ids = [text], list(ids)
        try:
            while finish is None:
                piece = await run.next(request)
                if piece is None:
                    return Response(status_code=CLIENT_CLOSED)
                text, ids, finish = piece
                pieces.append(text)
                token_ids += ids
        except BaseException:
            run.cancel()
            raise
        metrics.latency.labels(route).observe(time.monotonic() - run.started)
        response = completion_body(run.request_id, body.model, text="".join(pieces), finish=finish, chat=chat,
                                   chunk=False, token_ids=token_ids if body.return_token_ids else None)
        response["usage"] = usage(len(run.prompt), run.completion_tokens)
        if body.return_token_ids:
            response["prompt_token_ids"] = run.prompt
        log.info("request %s done: %s, %d tokens", run.request_id, finish, run.completion_tokens)
        return JSONResponse(response)

    async def stream(run: Run, body: SamplingRequest, first: tuple[str, list[int], str | None], *, chat: bool,
                     route: str) -> AsyncIterator[str]:
        """OpenAI's server-sent events: one chunk per piece of text, the finish reason, usage if asked, [DONE]."""
        ids_wanted = body.return_token_ids
        text, ids, finish = first
        try:
            if chat:  # a chat stream opens with the assistant's role
                yield _event(completion_body(run.request_id, body.model, text="", finish=None, chat=True,
                                             chunk=True, first=True))
            while True:
                if text or ids:
                    yield _event(completion_body(run.request_id, body.model, text=text, finish=None, chat=chat,
                                                 chunk=True, token_ids=ids if ids_wanted else None))
                if finish is not None:
                    break
                text, ids, finish = await run.next()
            yield _event(completion_body(run.request_id, body.model, text="", finish=finish, chat=chat, chunk=True))
            if body.stream_options is not None and body.stream_options.include_usage:
                chunk = completion_body(run.request_id, body.model, text="", finish=None, chat=chat, chunk=True)
                chunk["choices"], chunk["usage"] = [], usage(len(run.prompt), run.completion_tokens)
                yield _event(chunk)
            metrics.latency.labels(route).observe(time.monotonic() - run.started)
            log.info("request %s done: %s, %d tokens (streamed)", run.request_id, finish, run.completion_tokens)
        except Exception as exc:  # after the headers went out, an error can only be an event of the stream
            if not isinstance(exc, HubError):
                log.error("request %s (model %s) failed mid-stream: %s: %s", run.request_id, body.model,
                          type(exc).__name__, exc)
                exc = HubError("internal error; the server log has the details")
            yield _event(json.loads(error_response(exc).body))
        finally:  # also when the client went away mid-stream: the row is freed at the next step
            run.cancel()
        yield "data: [DONE]\n\n"

    return app


def _plan_for_load(engine: Engine, body: LoadLoraAdapterRequest) -> Plan:
    from hub.formats import adapter_digest, read_adapter
    from hub.server.plans import Plan

    if body.lora_path and Path(body.lora_path).is_dir():
        if not engine.config.allow_adapter_paths:
            raise InvalidRequest("loading adapters from folders on the server is off (--allow-adapter-paths); "
                                 "give a registry reference as lora_path, or register the folder first")
        adapter = read_adapter(body.lora_path)
        digest = adapter_digest(adapter)
        return Plan(model=body.lora_name, members=((digest, 1.0),), artifacts={digest: adapter})
    return engine.resolver.plan(body.lora_path or body.lora_name)


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _describe(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return "the request body is not valid JSON"
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg", "invalid request"))


def _param(exc: RequestValidationError) -> str | None:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):  # its loc is a character offset, not a field
        return None
    loc = [str(p) for p in (errors[0].get("loc", ()) if errors else ()) if p != "body"]
    return ".".join(loc) or None


def _context_length(model: Any, tokenizer: Any) -> int:
    length = getattr(model.config, "max_position_embeddings", None)
    if isinstance(length, int) and length > 0:
        return length
    return int(getattr(tokenizer, "model_max_length", 2048))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a completion: the generation config's (one or several) and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def run(hub: Hub, config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM; running requests get ``config.shutdown_timeout`` seconds to finish."""
    import uvicorn

    _setup_logging(config.log_json)
    app = create_app(hub, config)
    uvicorn.run(app, host=config.host, port=config.port, log_config=None, access_log=True,
                timeout_graceful_shutdown=config.shutdown_timeout)


def _setup_logging(as_json: bool) -> None:
    """One line per record, with time and logger (which request it concerns is in the message); secrets scrubbed."""
    from hub.secrets import scrub_logs

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if as_json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("hub", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    scrub_logs("hub", "uvicorn")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record), "level": record.levelname.lower(),
                           "logger": record.name, "message": record.getMessage()})
