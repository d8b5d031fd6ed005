"""Parsing of what users type: adapter names, references (``name@3``), metric conditions and sort keys."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hub.errors import QueryError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Metric keys cannot contain the comparison characters, so "accuracy>=0.8" splits one way only.
METRIC_KEY = re.compile(r"^[A-Za-z_][\w.-]{0,99}$")
CONDITION = re.compile(
    r"^\s*(?P<key>[A-Za-z_][\w.-]*)(@(?P<dataset>[^:<>=!\s]+)(:(?P<split>[^<>=!\s]+))?)?"
    r"\s*(?P<op>>=|<=|!=|==|=|>|<)\s*(?P<value>\S+)\s*$"
)
LATEST = "latest"


@dataclass(frozen=True)
class Ref:
    """``name`` (= ``name@latest``), ``name@3`` (a number) or ``name@prod`` (an alias)."""

    name: str
    number: int | None = None
    alias: str | None = None


@dataclass(frozen=True)
class Condition:
    """``key[@dataset[:split]] OP value``: a version matches when one of its metrics satisfies it."""

    key: str
    op: str
    value: float
    dataset: str | None = None
    split: str | None = None


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise QueryError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit (at most 200 characters)")
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS.match(alias):
        raise QueryError(f"invalid alias {alias!r}: use letters, digits, '.', '_' and '-'")
    if alias == LATEST:
        raise QueryError("'latest' is reserved: it always means the highest version that is not yanked")
    if alias.isdigit():
        raise QueryError(f"alias {alias!r} is a number and would shadow version {int(alias)}")
    return alias


def check_metric_key(key: str) -> str:
    if not isinstance(key, str) or not METRIC_KEY.match(key):
        raise QueryError(f"invalid metric name {key!r}: start with a letter or '_', then letters, digits, '_.-'")
    return key


def check_value(value: float, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise QueryError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise QueryError(f"{what}: {value!r} is not a finite number")
    return number


def parse_ref(ref: str) -> Ref:
    if not isinstance(ref, str):
        raise QueryError(f"invalid reference {ref!r}")
    name, sep, selector = ref.partition("@")
    check_name(name)
    if not sep or selector == LATEST:
        return Ref(name)
    if selector.isdigit():
        return Ref(name, number=int(selector))
    if not ALIAS.match(selector):
        raise QueryError(f"invalid reference {ref!r}: expected NAME, NAME@NUMBER or NAME@ALIAS")
    return Ref(name, alias=selector)


def parse_condition(text: str) -> Condition:
    match = CONDITION.match(text) if isinstance(text, str) else None
    if not match:
        raise QueryError(f"invalid metric condition {text!r}: expected e.g. 'accuracy>=0.8' "
                         "(operators >=, <=, >, <, =, !=)")
    value = check_value(match["value"], f"invalid metric condition {text!r}")
    op = "=" if match["op"] == "==" else match["op"]
    return Condition(match["key"], op, value, match["dataset"], match["split"])


def parse_sort(sort: str) -> tuple[str, bool]:
    """``accuracy`` → highest first; ``-loss`` → lowest first. Returns (metric key, descending)."""
    descending = not sort.startswith("-")
    key = sort[1:] if not descending else sort
    try:
        check_metric_key(key)
    except QueryError:
        raise QueryError(f"invalid sort {sort!r}: expected a metric name, or '-NAME' for lowest first") from None
    return key, descending
