"""The running rows and their KV cache: one transformers ``DynamicCache`` for all of them, padded on the left.

Each row's keys and values sit at the right end of the cache; the columns to their left are padding, masked out by
the attention mask. A row joins after its prefill (run alone, in its own cache): the shorter of the two caches is
padded on the left and the two are concatenated along the batch. A row leaves by being dropped from the batch;
padding columns no row needs any more are cut off. Positions (for rotary embeddings) are each row's own token
count, so a row computes what it would alone; only the padding differs, and masked padding adds exact zeros.

Joining and leaving copy the cache once; a decoding step only appends one column, as generation does.
"""

from __future__ import annotations

from typing import Any

import torch

from hub.server.errors import InvalidRequest


def check_cache_layers(cache: Any) -> None:
    """Refuse a model whose cache is not plain per-layer key/value tensors (sliding windows, linear attention):
    left padding is only sound for full attention. Raises InvalidRequest."""
    from transformers.cache_utils import DynamicLayer

    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        raise InvalidRequest(f"the server batches full-attention caches only; this model's cache has {sorted(odd)}")


class Batch:
    """Rows being decoded together (any objects; the scheduler's sequences), their cache and attention mask."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, L]: 1 where the cache holds a row's token, 0 for padding
        self.lengths: list[int] = []  # tokens each row holds in the cache (its next position)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: Any, cache: Any, length: int) -> None:
        """Add a row whose prefill produced ``cache`` (batch of one, ``length`` tokens)."""
        mask = torch.ones(1, length, dtype=torch.long, device=_device(cache))
        if not self.rows:
            self.rows, self.cache, self.mask, self.lengths = [row], cache, mask, [length]
            return
        width = max(self.mask.shape[1], length)
        self._pad(self.cache, width - self.mask.shape[1])
        self._pad(cache, width - length)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.rows.append(row)
        self.lengths.append(length)

    def remove(self, rows: list[Any]) -> None:
        """Drop ``rows`` from the batch (finished, cancelled) and the padding nobody needs any more."""
        gone = {id(row) for row in rows}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if not keep:
            self.rows, self.cache, self.mask, self.lengths = [], None, None, []
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        self.mask = self.mask[index]
        unused = int(self.mask.shape[1] - max(self.lengths))
        self.mask = self.mask[:, unused:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, unused:]
            layer.values = layer.values[index, :, unused:]

    def inputs(self, tokens: list[int]) -> dict[str, torch.Tensor]:
        """The next decoding step's model inputs: each row's latest token at its own position."""
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        return {
            "input_ids": torch.tensor(tokens, device=device).unsqueeze(1),
            "attention_mask": self.mask,
            "position_ids": torch.tensor(self.lengths, device=device).unsqueeze(1),
        }

    def advanced(self) -> None:
        """The step ran: every row holds one more token."""
        self.lengths = [length + 1 for length in self.lengths]

    @staticmethod
    def _pad(cache: Any, columns: int) -> None:
        if columns:
            for layer in cache.layers:
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, columns, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, columns, 0))


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


def _device(cache: Any) -> torch.device:
    return cache.layers[0].keys.device
