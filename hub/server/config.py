"""The server's settings, in one frozen object: what the command line (or ``Hub.serve``) gives."""

from __future__ import annotations

from dataclasses import dataclass

from hub.errors import QueryError

QUANTIZATIONS = (None, "nf4", "int8")


@dataclass(frozen=True)
class ServerConfig:
    """How ``hub serve`` runs.

    ``base``: the base model (``smollm2``, a folder or a Hub id); ``served_model_name``: the id clients use for it
    (default: ``base`` as given), the ``parent`` of every adapter in /v1/models. ``max_loaded``: adapters attached
    to the model at once (least recently used ones are detached when a request needs room). ``max_batch``: rows
    decoded together; ``max_queue``: requests waiting beyond those (more get 429). ``max_model_len``: prompt plus
    completion tokens per request (default: the model's context length). ``api_key``: required as a bearer token
    on /v1 routes when set. ``shutdown_timeout``: seconds running requests get to finish on SIGTERM.
    ``allow_adapter_paths``: /v1/load_lora_adapter may read PEFT folders on the server's disk (as vLLM's does);
    off by default, since it lets clients make the server read any folder it can.
    """

    base: str
    quantize: str | None = "nf4"
    device: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    max_loaded: int = 16
    max_batch: int = 16
    max_queue: int = 64
    max_model_len: int | None = None
    shutdown_timeout: float = 30.0
    allow_adapter_paths: bool = False
    log_json: bool = False

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZATIONS:
            raise QueryError(f"unknown quantization {self.quantize!r}: use nf4, int8 or none")
        for name in ("max_loaded", "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise QueryError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise QueryError(f"max_model_len must be at least 2, not {self.max_model_len}")
        if not 0 <= self.port <= 65535:
            raise QueryError(f"port {self.port} is not a TCP port")

    @property
    def model_id(self) -> str:
        """The id clients name the bare base by."""
        return self.served_model_name or self.base
