"""Typed adapter configs: each field of ``adapter_config.json`` checked against the kind of value PEFT expects.

A method declares its fields as ``{name: Kind}`` (``Method.fields``, on top of ``COMMON_FIELDS``). ``check_config``
refuses the first malformed field with one line naming it and what was expected; fields a method does not declare
are kept as they are, as PEFT keeps (and warns about) keys it does not know. Torch-free: registry commands read
configs without loading it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hub.errors import InvalidArtifact

# Deeper than any PEFT config (the deepest, an X-LoRA adapters map or a LoRA's nested *_config, is 3 levels);
# bounds every recursive walk over the config (digest, writing, validation).
MAX_DEPTH = 16


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Kind:
    """One field's kind of value; ``check`` returns an error phrase (what was expected) or None."""

    expected = "a value"

    def check(self, value: Any) -> str | None:
        return None


@dataclass(frozen=True)
class Int(Kind):
    minimum: int = 0

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"an integer >= {self.minimum}"

    def check(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            return self.expected
        return None


@dataclass(frozen=True)
class Number(Kind):
    positive: bool = False

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "a positive number" if self.positive else "a finite number"

    def check(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return self.expected
        if self.positive and value <= 0:
            return self.expected
        return None


@dataclass(frozen=True)
class Bool(Kind):
    expected = "true or false"

    def check(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else self.expected


@dataclass(frozen=True)
class Text(Kind):
    """A string; with ``choices``, one of them (compared case-insensitively, as PEFT's enums are)."""

    choices: tuple[str, ...] = ()

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"one of {', '.join(self.choices)}" if self.choices else "a string"

    def check(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return self.expected
        if self.choices and value.lower() not in {c.lower() for c in self.choices}:
            return self.expected
        return None


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return f"a valid regular expression (not {_show(pattern)})"
    return None


@dataclass(frozen=True)
class Modules(Kind):
    """PEFT's module selectors: a list of names, or (with ``regex``) one regular expression matched in full."""

    regex: bool = True

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "a list of module names or a regular expression" if self.regex else "a list of module names"

    def check(self, value: Any) -> str | None:
        if isinstance(value, str):
            return _regex_problem(value) if self.regex else self.expected
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return self.expected
        if not self.regex:  # names used inside regular expressions (modules_to_save, layers_pattern)
            return next((p for item in value if (p := _regex_problem(item))), None)
        return None


@dataclass(frozen=True)
class Layers(Kind):
    """``layers_to_transform``: a layer index or a list of them."""

    expected = "a layer index or a list of layer indices"

    def check(self, value: Any) -> str | None:
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            return self.expected
        return None


@dataclass(frozen=True)
class Pattern(Kind):
    """``rank_pattern`` / ``alpha_pattern``: regular expressions over module paths → a value of ``values``'s kind."""

    values: Kind = Number()

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"an object from module patterns to {self.values.expected}"

    def check(self, value: Any) -> str | None:
        if not isinstance(value, dict):
            return self.expected
        for key, item in value.items():
            if _regex_problem(key) is not None:
                return "an object whose keys are valid regular expressions"
            if self.values.check(item) is not None:
                return self.expected
        return None


@dataclass(frozen=True)
class Either(Kind):
    """Any of several kinds (PEFT's ``Union`` fields, e.g. init_lora_weights: a bool or the name of an init)."""

    kinds: tuple[Kind, ...] = ()

    @property
    def expected(self) -> str:  # type: ignore[override]
        return " or ".join(kind.expected for kind in self.kinds)

    def check(self, value: Any) -> str | None:
        return None if any(kind.check(value) is None for kind in self.kinds) else self.expected


@dataclass(frozen=True)
class Object(Kind):
    expected = "an object"

    def check(self, value: Any) -> str | None:
        return None if isinstance(value, dict) else self.expected


# Fields every PEFT config may carry (PeftConfigMixin, PeftConfig and the module-selecting tuner configs).
COMMON_FIELDS: dict[str, Kind] = {
    "peft_type": Text(),
    "task_type": Text(),
    "base_model_name_or_path": Text(),
    "revision": Text(),
    "inference_mode": Bool(),
    "peft_version": Text(),
    "target_modules": Modules(),
    "exclude_modules": Modules(),
    "modules_to_save": Modules(regex=False),
    "layers_to_transform": Layers(),
    "layers_pattern": Either((Text(), Modules(regex=False))),
    "rank_pattern": Object(),
    "alpha_pattern": Object(),
}


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON value, counted up to ``limit + 1`` (so a hostile config costs nothing extra)."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((depth(item, limit - 1) for item in items), default=0)


def check_config(config: Mapping[str, Any], fields: Mapping[str, Kind]) -> None:
    """Refuse the first field of ``config`` that is not of its declared kind (``None`` is PEFT's unset).

    Raises InvalidArtifact: ``adapter_config.json: r must be an integer >= 1, not 'eight'``.
    """
    if depth(config) > MAX_DEPTH:
        raise InvalidArtifact(f"adapter_config.json nests deeper than {MAX_DEPTH} levels")
    for name, kind in {**COMMON_FIELDS, **fields}.items():
        value = config.get(name)
        if value is None:
            continue
        problem = kind.check(value)
        if problem is not None:
            raise InvalidArtifact(f"adapter_config.json: {name} must be {problem}, not {_show(value)}")
