"""Training and evaluation examples: JSONL files of prompt/completion pairs or chat messages."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hub.errors import InvalidArtifact


@dataclass(frozen=True)
class Example:
    """One supervised example: the model sees ``prompt`` and learns to continue with ``completion``."""

    prompt: str
    completion: str

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.completion}


def read_jsonl(path: str | os.PathLike[str], *, tokenizer: Any = None) -> list[Example]:
    """Read ``{"prompt", "completion"}`` lines or ``{"messages": [...]}`` chats (the last assistant turn is the
    completion, everything before it the prompt, rendered with ``tokenizer``'s chat template when it has one).
    Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArtifact(f"{path} does not exist")
    examples = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:  # line by line, so a bad byte is reported where it is; a leading byte-order mark is accepted
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise InvalidArtifact(f"{path}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArtifact(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            examples.append(_example(record, f"{path}:{number}", tokenizer))
    if not examples:
        raise InvalidArtifact(f"{path} holds no examples")
    return examples


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.to_dict()) + "\n")
    return path


def _example(record: object, where: str, tokenizer: Any = None) -> Example:
    if not isinstance(record, dict):
        raise InvalidArtifact(f"{where}: expected a JSON object")
    if "messages" in record:
        return _chat_example(record["messages"], where, tokenizer)
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise InvalidArtifact(f"{where}: needs string fields 'prompt' and 'completion' (or 'messages')")
    if not completion:
        raise InvalidArtifact(f"{where}: 'completion' is empty")
    return Example(prompt=prompt, completion=completion)


def _chat_example(messages: object, where: str, tokenizer: Any = None) -> Example:
    if not isinstance(messages, list) or not messages:
        raise InvalidArtifact(f"{where}: 'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise InvalidArtifact(f"{where}: every message needs 'role' and string 'content'")
    if messages[-1]["role"] != "assistant":
        raise InvalidArtifact(f"{where}: the last message must be the assistant's answer")
    if not messages[-1]["content"]:
        raise InvalidArtifact(f"{where}: the assistant's answer is empty")
    if getattr(tokenizer, "chat_template", None):
        return _templated(tokenizer, messages, where)
    # No template to follow: a plain role-tagged rendering, so prompt masking stays exact.
    prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages[:-1]) + "<|assistant|>\n"
    return Example(prompt=prompt, completion=messages[-1]["content"])


def _templated(tokenizer: Any, messages: list[dict[str, str]], where: str) -> Example:
    """Prompt: the chat up to the assistant's turn, as the model's template renders it with the generation prompt;
    completion: what the full chat adds to that, without the trailing end-of-sequence (``encode`` appends EOS)."""
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # templates raise whatever jinja or the template itself raises
        raise InvalidArtifact(f"{where}: the tokenizer's chat template cannot render this chat ({exc})") from None
    if not full.startswith(prompt):
        raise InvalidArtifact(
            f"{where}: the chat template renders the earlier turns differently once the answer is added,"
            " so the prompt cannot be masked"
        )
    completion = full[len(prompt):].rstrip()
    eos = getattr(tokenizer, "eos_token", None)
    if eos and completion.endswith(eos):
        completion = completion[: -len(eos)]
    bos = getattr(tokenizer, "bos_token", None)
    if bos and prompt.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        prompt = prompt[len(bos):]  # ``encode`` adds the BOS the tokenizer adds itself; the template's would double it
    return Example(prompt=prompt, completion=completion)


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + completion (+ EOS) and labels that score only the completion."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int


def encode(tokenizer: Any, example: Example, *, max_length: int, index: int | None = None) -> Encoded:
    """Tokenize prompt and completion separately (so masking is exact) and append EOS so the model learns to stop.
    Raises InvalidArtifact for an example that is not an ``Example`` or is longer than ``max_length`` tokens (``index``,
    its position in the caller's list, names it)."""
    where = f"example {index}" if index is not None else "an example"
    if not isinstance(example, Example):
        raise InvalidArtifact(f"{where} is a {type(example).__name__}, not a hub.data.Example(prompt, completion)")
    too_long = f"{where} has {{}} tokens, longer than the model's context of {max_length}"
    prompt = _token_ids(tokenizer, example.prompt, max_length, special=True, too_long=too_long)
    completion = _token_ids(tokenizer, example.completion, max_length, special=False, too_long=too_long)
    if tokenizer.eos_token_id is not None:
        completion = [*completion, tokenizer.eos_token_id]
    ids = prompt + completion
    if len(ids) > max_length:
        raise InvalidArtifact(too_long.format(len(ids)))
    return Encoded(input_ids=ids, labels=[-100] * len(prompt) + completion, prompt_length=len(prompt))


def _token_ids(tokenizer: Any, text: str, max_length: int, *, special: bool, too_long: str) -> list[int]:
    """``text``'s token ids. A text far longer than the context is first tokenized only as far as it takes to know
    that it cannot fit (a 20 MB line cost minutes and 8 GB before it was refused): no token stands for more
    characters than the vocabulary's longest entry, so a head of 4× that many per context position holds more
    tokens than fit, unless the tokenizer drops characters (then the whole text is tokenized after all)."""
    longest = _longest_token(tokenizer) if len(text) > 4 * max_length else None  # the vocabulary read only then
    head = None if longest is None else 4 * max_length * longest
    if head is not None and len(text) > head:
        count = len(tokenizer(text[:head], add_special_tokens=special)["input_ids"])
        if count > max_length + 1:  # + 1: cutting the text may split its last token in two
            raise InvalidArtifact(too_long.format(f"more than {max_length}") + f" ({len(text)} characters)")
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _longest_token(tokenizer: Any) -> int | None:
    """Characters in the tokenizer's longest vocabulary entry (as stored: byte-level BPE spells each byte as one
    character, so this bounds the characters a token stands for); None for a tokenizer without ``get_vocab``."""
    vocabulary = getattr(tokenizer, "get_vocab", None)
    return max(map(len, vocabulary()), default=1) if callable(vocabulary) else None


def encode_all(model: Any, tokenizer: Any, examples: Sequence[Example]) -> tuple[list[Encoded], int]:
    """Every example ``encode``d within ``model``'s context (InvalidArtifact names the first that is longer), and
    the id to pad batches with (the tokenizer's pad token, else EOS)."""
    limit = context_length(model)
    encoded = [encode(tokenizer, ex, max_length=limit, index=i) for i, ex in enumerate(examples)]
    return encoded, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def context_length(model: Any) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


def collate(
    batch: Sequence[Encoded], *, pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad encoded examples into (input_ids, labels, attention_mask): on the right, or on the ``left`` (every
    completion then ends at the last position)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        span = slice(width - n, width) if left else slice(0, n)
        ids[row, span] = torch.tensor(e.input_ids)
        labels[row, span] = torch.tensor(e.labels)
        mask[row, span] = 1
    return ids, labels, mask
