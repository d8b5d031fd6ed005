"""Prometheus metrics of one server (its own registry, so several servers can live in one process, as in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests, tokens, queue depth, batch occupancy, adapter cache and latencies, prefixed ``hub_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hub_requests", "Requests answered, by route and HTTP status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("hub_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("hub_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("hub_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.running = Gauge("hub_running_sequences", "Rows in the running batch", registry=r)
        self.batch_rows = Histogram("hub_batch_occupancy_rows", "Rows per decoding forward", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.adapter_cache = Counter("hub_adapter_cache", "Adapter cache lookups by result (hit, miss) and evictions",
                                     ["result"], registry=r)
        self.loaded_adapters = Gauge("hub_loaded_adapters", "Adapters attached to the model", registry=r)
        self.latency = Histogram("hub_request_latency_seconds", "Time from request to last token, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("hub_time_to_first_token_seconds", "Time from request to first token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("hub_decode_step_seconds", "Seconds per decoding forward over the running batch",
                              buckets=LATENCY_BUCKETS, registry=r)
