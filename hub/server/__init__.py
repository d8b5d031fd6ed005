"""``hub serve``: an OpenAI-compatible server in which every request picks any registered adapter or composition.

Layout, bottom up:

* ``config``: the server's settings (``ServerConfig``);
* ``errors``: what a request can run into besides the hub's own errors (queue full, not ready, bad parameters);
* ``plans``: what a request runs (``Plan``: adapters by digest with weights, or a mixture), resolved from registry
  references, and ``AdapterCache``: the adapters attached to the served model, least recently used first out;
* ``batch``: the running rows and their KV cache, padded on the left into one batch;
* ``gates``: the per-row (and, for mixtures, per-token) gates that let rows with different adapters share a forward;
* ``scheduler``: the model's thread: admits queued requests between decoding steps (continuous batching), prefills
  them, decodes every running row in one forward, samples, streams tokens back;
* ``text``: incremental detokenization and stop strings; ``metrics``: Prometheus metrics;
* ``app``: the FastAPI application (the OpenAI routes, vLLM's adapter routes, /health, /metrics), ``serve``.

Importing this package loads neither torch nor FastAPI; ``serve`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hub.server.config import ServerConfig

if TYPE_CHECKING:
    from hub.client import Hub

__all__ = ["ServerConfig", "serve"]


def serve(hub: Hub, config: ServerConfig) -> None:
    """Run the server until it is stopped (SIGINT/SIGTERM: in-flight requests finish first)."""
    from hub.server.app import run

    run(hub, config)
