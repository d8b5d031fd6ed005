"""Tokens back to text as they come: incremental detokenization and OpenAI's ``stop`` strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """The text of a growing list of tokens, released in pieces that never change afterwards.

    The whole completion is decoded again at each token (subword tokenizers may merge a token with the ones before
    it), and text is held back while it ends in an incomplete UTF-8 character or could be the start of a stop
    string; ``stopped`` is set at the first stop string, whose text (and what follows) is never released.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly released text."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if decoded.endswith("\ufffd"):
            return ""
        cut = self._first_stop(decoded)
        if cut is not None:
            self.stopped = True
            return self._release(decoded[:cut])
        return self._release(decoded[: len(decoded) - self._held_back(decoded)])

    def finish(self) -> str:
        """The text held back, at the end of the completion."""
        if self.stopped or not self.tokens:
            return ""
        return self._release(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _release(self, upto: str) -> str:
        piece = upto[len(self.text):] if upto.startswith(self.text) else ""
        self.text += piece
        return piece

    def _first_stop(self, decoded: str) -> int | None:
        # Only text not released yet can hold a new stop (minus a stop's length, for one straddling the boundary).
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        found = [i for i in (decoded.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, decoded: str) -> int:
        """How many trailing characters could begin a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(decoded)), longest, -1):
                if decoded.endswith(stop[:size]):
                    longest = size
                    break
        return longest
