"""The model's thread: continuous batching over rows that each run their own adapters.

One thread owns the model (attaching, detaching, every forward). Its loop:

1. run control calls queued by the HTTP side (load/unload an adapter: they attach and detach modules);
2. drop rows whose client went away or whose text hit a stop string;
3. admit waiting requests, oldest first, while the batch has room and their adapters can be attached (the adapter
   cache detaches unused ones for room); each admitted request is prefilled alone, in its own KV cache, which
   then joins the batch's (``hub.server.batch``);
4. decode one token for every running row in a single forward, each row through its own gates
   (``hub.server.gates``); rows that finish leave at once and free their place for the next waiting request.

A request never waits for the batch it would join to finish, and the batch never restarts for it: rows join and
leave at every step. The queue of waiting requests is bounded (``Overloaded`` beyond it), so is the batch.

Greedy rows compute what the same prompt gives alone with the same adapter attached: the prefill runs exactly as
generation does, and a decoding step differs only by masked padding and the batched matmul's rounding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from hub.errors import HubError
from hub.server.batch import Batch, check_cache_layers
from hub.server.errors import InvalidRequest, NotReady, Overloaded
from hub.server.gates import RowGates
from hub.server.metrics import Metrics
from hub.server.plans import AdapterCache, Plan

log = logging.getLogger(__name__)
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing logits by a smaller one overflows float32
# to inf, whose softmax is NaN.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields: ``temperature`` 0 (or below ``GREEDY_BELOW``) is greedy; ``seed`` makes sampling
    reproducible per request."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


# What a sequence reports back, in order: Token* then exactly one of Finished or Failed.
@dataclass(frozen=True)
class Token:
    id: int


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end-of-sequence token) or "length" (max_tokens)


@dataclass(frozen=True)
class Failed:
    error: Exception


class Sequence:
    """One request's row: its plan, prompt, sampling parameters, and ``emit`` (thread-safe) for its events."""

    def __init__(self, request_id: str, plan: Plan, prompt: list[int], params: SamplingParams,
                 emit: Callable[[Any], None]):
        self.request_id, self.plan, self.prompt, self.params, self._emit = request_id, plan, prompt, params, emit
        self.generated = 0
        self.last: int | None = None
        self.cancelled = False  # set by the HTTP side: the client left, or a stop string matched
        self.created = time.monotonic()
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.gate_logits: dict[str, torch.Tensor] = {}  # a sequence-routed mixture's prompt gates, per layer

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: Any) -> None:
        try:
            self._emit(event)
        except RuntimeError:  # the request's event loop is gone (client disconnected, server stopping)
            self.cancelled = True


class Scheduler:
    """See the module docstring. ``submit`` and ``call`` are thread-safe; everything else runs on its thread."""

    def __init__(self, model: torch.nn.Module, cache: AdapterCache, metrics: Metrics, *, device: torch.device,
                 eos_ids: set[int], max_batch: int, max_queue: int):
        self.model, self.cache, self.metrics, self.device = model, cache, metrics, device
        self.eos_ids, self.max_batch, self.max_queue = eos_ids, max_batch, max_queue
        self.gates = RowGates(model)
        self.batch = Batch()
        self._waiting: deque[Sequence] = deque()
        self._calls: list[tuple[Callable[[], Any], Future]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="hub-scheduler", daemon=True)
        # transformers 5.x renamed the KV cache argument ``cache`` (earlier: ``past_key_values``).
        import inspect

        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._cache_checked = False

    # -- the HTTP side --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, sequence: Sequence) -> None:
        """Queue a request. Raises Overloaded when the queue is full, NotReady while stopping."""
        with self._wake:
            if self._stopping:
                raise NotReady("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are waiting already (--max-queue {self.max_queue}); "
                                 "retry shortly")
            self._waiting.append(sequence)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the model's thread between two forwards; its result (or error) comes in the future."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                raise NotReady("the server is shutting down")
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def wake(self) -> None:
        """Look at the rows again now (a request was cancelled while the thread waits for work)."""
        with self._wake:
            self._wake.notify()

    def stop(self, timeout: float) -> None:
        """Refuse new requests, give queued and running ones ``timeout`` seconds to finish, fail the rest."""
        with self._wake:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
            self._wake.notify()
        self._thread.join(timeout + 10)

    # -- the model's thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad():
            while self._next():
                pass

    def _next(self) -> bool:
        """One turn of the loop; False when the thread should end."""
        with self._wake:
            while not (self._calls or self._waiting or self.batch.rows or self._stopping):
                self._wake.wait()
            calls, self._calls = self._calls, []
            if self._stopping and (not (self._waiting or self.batch.rows) or time.monotonic() > self._deadline):
                self._fail_all(NotReady("the server shut down before this request finished"), calls)
                return False
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as exc:  # handed to the caller, which reports it
                future.set_exception(exc)
        self._drop_cancelled()
        for sequence in self._admit():
            self._prefill(sequence)
        if self.batch.rows:
            self._decode()
        return True

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        while len(self.batch) + len(admitted) < self.max_batch:
            with self._wake:
                if not self._waiting:
                    break
                sequence = self._waiting.popleft()
                self.metrics.queue_depth.set(len(self._waiting))
            if sequence.cancelled:
                continue
            try:
                ready = self.cache.acquire(sequence.plan)
            except Exception as exc:
                self._fail(sequence, exc)
                continue
            if not ready:
                if not self.batch.rows and not admitted:  # nothing will free an adapter: pinned ones fill the cache
                    self._fail(sequence, Overloaded(
                        f"every adapter slot is pinned (--max-loaded {self.cache.max_loaded}): unload one first"))
                    continue
                with self._wake:  # back to the head of the queue until a running row frees its adapters
                    self._waiting.appendleft(sequence)
                    self.metrics.queue_depth.set(len(self._waiting))
                break
            admitted.append(sequence)
        return admitted

    def _prefill(self, sequence: Sequence) -> None:
        from transformers import DynamicCache

        prompt = torch.tensor([sequence.prompt], device=self.device)
        cache = DynamicCache(config=self.model.config)
        try:
            logits = self._forward([sequence], cache, input_ids=prompt,
                                   attention_mask=torch.ones_like(prompt),
                                   position_ids=torch.arange(prompt.shape[1], device=self.device).unsqueeze(0))
            if not self._cache_checked:
                check_cache_layers(cache)
                self._cache_checked = True
            token = self._sample(logits, [sequence])[0]
        except Exception as exc:
            self._fail(sequence, exc, release=True)
            return
        if token is None:
            self._fail(sequence, _not_finite(), release=True)
            return
        self.metrics.prompt_tokens.inc(len(sequence.prompt))
        if self._emit(sequence, token):
            self.cache.release(sequence.plan)
        else:
            self.batch.add(sequence, cache, len(sequence.prompt))
            self.metrics.running.set(len(self.batch))

    def _decode(self) -> None:
        rows = list(self.batch.rows)
        started = time.perf_counter()
        try:
            inputs = self.batch.inputs([row.last for row in rows])
            logits = self._forward(rows, self.batch.cache, **inputs)
            self.batch.advanced()
            tokens = self._sample(logits, rows)
        except Exception as exc:
            # The batch's cache is in an unknown state: every row fails, the next requests start a fresh batch.
            log.exception("decoding step failed for requests %s", ", ".join(row.request_id for row in rows))
            for row in rows:
                self._fail(row, exc, release=True)
            self.batch = Batch()
            self.metrics.running.set(0)
            return
        self.metrics.step.observe(time.perf_counter() - started)
        self.metrics.batch_rows.observe(len(rows))
        broken = [row for row, token in zip(rows, tokens, strict=True) if token is None]
        for row in broken:  # only those rows: the others' logits and cache columns are their own
            self._fail(row, _not_finite())
        done = [row for row, token in zip(rows, tokens, strict=True) if token is not None and self._emit(row, token)]
        self._leave(done + broken)

    def _forward(self, rows: list[Sequence], cache: Any, **inputs: torch.Tensor) -> torch.Tensor:
        """Last-position logits [B, vocab] of one forward, each row through its plan's gates."""
        with self.gates.rows([row.plan for row in rows], self.cache.names(), self.device,
                             [row.gate_logits for row in rows]):
            out = self.model(**inputs, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :]

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[int | None]:
        """Each row's next token; None for a row whose logits hold NaN or +inf (nothing sensible to sample)."""
        greedy = logits.argmax(dim=-1).tolist()
        finite = (~(logits.isnan() | logits.isposinf()).any(dim=-1)).tolist()
        tokens: list[int | None] = []
        for i, row in enumerate(rows):
            params = row.params
            if not finite[i]:
                tokens.append(None)
                continue
            if params.temperature < GREEDY_BELOW:
                tokens.append(greedy[i])
                continue
            probs = torch.softmax(logits[i].float().cpu() / params.temperature, dim=-1)
            if params.top_p < 1:
                # Nucleus: keep the most likely tokens up to top_p of the mass (always the first one).
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(0) - ordered > params.top_p
                probs = probs.scatter(0, order, ordered.masked_fill(outside, 0))
            tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return tokens

    def _emit(self, row: Sequence, token: int) -> bool:
        """Report ``token``; True when the row is finished."""
        row.generated += 1
        row.last = token
        if row.generated == 1:
            self.metrics.first_token.observe(time.monotonic() - row.created)
        self.metrics.generation_tokens.inc()
        row.emit(Token(token))
        if token in self.eos_ids and not row.params.ignore_eos:
            row.emit(Finished("stop"))
            return True
        if row.generated >= row.params.max_tokens:
            row.emit(Finished("length"))
            return True
        return row.cancelled

    def _drop_cancelled(self) -> None:
        gone = [row for row in self.batch.rows if row.cancelled]
        if gone:
            log.info("freed the rows of requests %s (client gone or stop string)",
                     ", ".join(row.request_id for row in gone))
            self._leave(gone)

    def _leave(self, rows: list[Sequence]) -> None:
        if rows:
            self.batch.remove(rows)
            for row in rows:
                self.cache.release(row.plan)
            self.metrics.running.set(len(self.batch))

    def _fail(self, sequence: Sequence, error: Exception, *, release: bool = False) -> None:
        if release:
            self.cache.release(sequence.plan)
        if not isinstance(error, HubError):
            log.error("request %s (model %s) failed: %s: %s", sequence.request_id, sequence.plan.model,
                      type(error).__name__, error)
        sequence.emit(Failed(error))

    def _fail_all(self, error: HubError, calls: list[tuple[Callable[[], Any], Future]]) -> None:
        for _, future in calls:
            future.set_exception(error)
        for row in self.batch.rows:
            self._fail(row, error, release=True)
        self.batch = Batch()
        while self._waiting:
            self._fail(self._waiting.popleft(), error)
        self.metrics.queue_depth.set(0)
        self.metrics.running.set(0)


def _not_finite() -> InvalidRequest:
    return InvalidRequest("the model's output for this request is not finite (NaN or infinite logits): its adapters "
                          "or their weights overflow the served model")
