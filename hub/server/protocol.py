"""OpenAI's request and response shapes (the parts this server implements), plus its error JSON.

Requests are pydantic models, so a wrong type or a value out of range is a 400 before anything runs. Fields OpenAI
defines that the server does not implement (``logprobs``, ``n`` > 1, ``tools``...) are refused when set rather
than silently ignored; unknown fields are ignored, as OpenAI's own API does with fields of newer clients.
Extensions: ``adapters`` (a per-request weighted stack), vLLM's ``return_token_ids`` and ``ignore_eos``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hub.secrets import scrub

MAX_STOP_STRINGS = 16
FLOAT32_MAX = 3.4028234663852886e38


class AdapterWeight(BaseModel):
    """One adapter of a per-request composition: a registry reference and its weight."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    # Within float32, which the per-row gates hold.
    weight: float = Field(default=1.0, ge=-FLOAT32_MAX, le=FLOAT32_MAX, allow_inf_nan=False)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)  # what torch's generator takes (vLLM's bound)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    logprobs: Literal[None, False] = None
    user: str | None = None
    adapters: list[AdapterWeight] | None = Field(default=None, min_length=1)
    return_token_ids: bool = False  # vLLM's extension: the prompt's and the completion's token ids
    ignore_eos: bool = False  # vLLM's extension (benchmarks): generate max_tokens whatever the model says

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            from hub.server.errors import InvalidRequest

            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, not {len(stops)}")
        return stops


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] = Field(min_length=1)
    echo: Literal[False] = False
    suffix: None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": text}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    tools: None = None
    response_format: None = None


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's runtime adapter loading: ``lora_name`` is served from now on. ``lora_path``: a registry reference
    (default: ``lora_name`` itself) or a PEFT folder on the server's disk."""

    lora_name: str = Field(min_length=1)
    lora_path: str | None = None


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def error_body(message: str, *, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON, its message scrubbed of every secret the process knows (tokens, the API key)."""
    return {"error": {"message": scrub(message), "type": kind, "param": param, "code": code}}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(request_id: str, model: str, *, text: str | None, finish: str | None, chat: bool,
                    chunk: bool, first: bool = False, token_ids: list[int] | None = None) -> dict[str, Any]:
    """One completion response, or one streamed chunk of it (``text`` the delta; ``first`` opens a chat reply)."""
    choice: dict[str, Any] = {"index": 0}
    if chat and chunk:
        delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
        if text and not first:
            delta["content"] = text
        choice["delta"] = delta
    elif chat:
        choice["message"] = {"role": "assistant", "content": text or ""}
    else:
        choice["text"] = text or ""
    choice["logprobs"] = None
    choice["finish_reason"] = finish
    if token_ids is not None:
        choice["token_ids"] = token_ids
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
