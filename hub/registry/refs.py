"""Parsing and checking what users type: adapter names, references (``name@3``), aliases, tags, metric conditions,
sort keys, and every other string or number that reaches the registry.

One schema contract for every backend: the limits below are checked here, before a database sees a value, so
SQLite (which stores any length) and PostgreSQL (which refuses what does not fit a column) accept exactly the
same input. Each limit matches its column in ``hub.registry.models``.

Patterns use ``fullmatch``: ``re.match(r"...$")`` also accepts a trailing newline (``'date\\n'``).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

from hub.errors import QueryError

# Column sizes (characters): the registry refuses longer values on every backend.
NAME_MAX = 200
ALIAS_MAX = 100
TAG_MAX = 100
METRIC_KEY_MAX = 100
DATASET_MAX = 200
SPLIT_MAX = 100
BASE_NAME_MAX = 500
REVISION_MAX = 200
ARCHITECTURE_MAX = 200
METHOD_MAX = 32
STRATEGY_MAX = 50
REPO_ID_MAX = 300
REMOTE_TAG_MAX = 200
COMMIT_MAX = 64
HASH_MAX = 64
DESCRIPTION_MAX = 10_000
# Integer columns: INTEGER (version numbers, ranks) and BIGINT (sizes, parameter counts).
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}")
ALIAS = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{ALIAS_MAX - 1}}}")
# Metric keys cannot contain the comparison characters, so "accuracy>=0.8" splits one way only.
METRIC_KEY = re.compile(rf"[A-Za-z_][\w.-]{{0,{METRIC_KEY_MAX - 1}}}")
DIGITS = re.compile(r"[0-9]+")
CONDITION = re.compile(
    r"\s*(?P<key>[A-Za-z_][\w.-]*)(@(?P<dataset>[^:<>=!\s]+)(:(?P<split>[^<>=!\s]+))?)?"
    r"\s*(?P<op>>=|<=|!=|==|=|>|<)\s*(?P<value>\S+)\s*"
)
# Aliases become tags on a pushed repository and revisions on a pull: none may read as a version tag (v3), a
# branch or symbolic ref, or a full commit id.
VERSION_TAG = re.compile(r"v[0-9]+")
GIT_REFS = {"main", "master", "head"}
COMMIT_ID = re.compile(r"[0-9a-f]{40}")
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


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` for a one-line message, cut short when long."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"


def _bad_character(text: str, *, multiline: bool) -> str | None:
    """The first character no registry string may hold: control characters (NUL, newline unless ``multiline``,
    escape...), line separators and unpaired surrogates (not encodable as UTF-8)."""
    for char in text:
        if multiline and char in "\n\t\r":
            continue
        if unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
            return char
    return None


def check_text(value: object, what: str, limit: int, *, forbid: str = "", spaces: bool = True,
               multiline: bool = False) -> str:
    """``value`` as a registry string: non-empty, at most ``limit`` characters, no control characters (tab and
    newlines only when ``multiline``), no whitespace unless ``spaces``, none of the characters in ``forbid``.

    Raises QueryError naming ``what`` and the rule broken.
    """
    if not isinstance(value, str) or not value:
        raise QueryError(f"{what} must be a non-empty string, not {shown(value)}")
    if len(value) > limit:
        raise QueryError(f"{what} {shown(value)} is {len(value)} characters long; at most {limit}")
    bad = _bad_character(value, multiline=multiline)
    if bad is not None:
        raise QueryError(f"{what} {shown(value)} contains the control character {bad!r}")
    if not spaces and any(char.isspace() for char in value):
        raise QueryError(f"{what} {shown(value)} contains whitespace")
    for char in forbid:
        if char in value:
            raise QueryError(f"{what} {shown(value)} contains {char!r}")
    return value


def check_int(value: object, what: str, *, minimum: int = 0, maximum: int = INT32_MAX) -> int:
    """``value`` (an int, or a string of ASCII digits) as an int in ``[minimum, maximum]``, else QueryError.

    Strict on purpose: ``int()`` also takes '١' (Arabic-Indic one), '1_000' and ' 7 '; a bool is not a number.
    The CLI uses it for options such as ``--min-rank``.
    """
    if isinstance(value, str):
        text = value[1:] if value.startswith("-") else value
        if not DIGITS.fullmatch(text) or len(text) > 20:
            raise QueryError(f"{what} must be a whole number, not {shown(value)}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise QueryError(f"{what} must be a whole number, not {shown(value)}")
    if not minimum <= value <= maximum:
        raise QueryError(f"{what} must be between {minimum} and {maximum}, not {value}")
    return value


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise QueryError(f"invalid adapter name {shown(name)}: use letters, digits, '.', '_' and '-', "
                         f"starting with a letter or digit (at most {NAME_MAX} characters)")
    return name


def check_alias(alias: object) -> str:
    """An alias that ``set_alias`` may create. Raises QueryError for malformed or reserved ones."""
    if not isinstance(alias, str) or not ALIAS.fullmatch(alias):
        raise QueryError(f"invalid alias {shown(alias)}: use letters, digits, '.', '_' and '-', starting with a "
                         f"letter or digit (at most {ALIAS_MAX} characters)")
    if alias == LATEST:
        raise QueryError("'latest' is reserved: it always means the highest version that is not yanked")
    if alias.isdigit():
        raise QueryError(f"alias {alias!r} is a number and would shadow version {int(alias)}")
    if VERSION_TAG.fullmatch(alias):
        raise QueryError(f"alias {alias!r} looks like a version tag; pushed versions are tagged v1, v2... "
                         "choose another alias (e.g. 'prod', 'stable')")
    if alias.lower() in GIT_REFS or COMMIT_ID.fullmatch(alias):
        raise QueryError(f"alias {alias!r} looks like a git branch, ref or commit and would be ambiguous on a "
                         "pushed repository; choose another alias")
    if ".." in alias or alias.endswith((".", ".lock")):  # git check-ref-format's rules that ALIAS lets through
        raise QueryError(f"alias {alias!r} cannot be a git tag (no '..', no '.' or '.lock' at the end), so it could "
                         "not be pushed; choose another alias")
    return alias


def check_metric_key(key: object) -> str:
    if not isinstance(key, str) or not METRIC_KEY.fullmatch(key):
        raise QueryError(f"invalid metric name {shown(key)}: start with a letter or '_', then letters, digits, "
                         f"'_.-' (at most {METRIC_KEY_MAX} characters)")
    return key


def check_dataset(dataset: object) -> str:
    # Without ':' and comparison characters, so every stored dataset can be asked for as `key@dataset:split>=x`.
    return check_text(dataset, "metric dataset", DATASET_MAX, forbid=":<>=!", spaces=False)


def check_split(split: object) -> str:
    return check_text(split, "metric split", SPLIT_MAX, forbid="<>=!", spaces=False)


def check_description(description: object) -> str:
    return check_text(description, "description", DESCRIPTION_MAX, multiline=True)


def check_value(value: object, what: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise QueryError(f"{what}: {shown(value)} is not a number") from None
    if not math.isfinite(number):
        raise QueryError(f"{what}: {shown(value)} is not a finite number")
    return number


def parse_ref(ref: object) -> Ref:
    """``name``, ``name@latest``, ``name@N`` (ASCII digits, 1..2^31-1) or ``name@alias``; else QueryError."""
    if not isinstance(ref, str):
        raise QueryError(f"invalid reference {shown(ref)}")
    name, sep, selector = ref.partition("@")
    check_name(name)
    if not sep or selector == LATEST:
        return Ref(name)
    if DIGITS.fullmatch(selector):
        return Ref(name, number=check_int(selector, f"version number in {shown(ref)}", minimum=1))
    if not ALIAS.fullmatch(selector):
        raise QueryError(f"invalid reference {shown(ref)}: expected NAME, NAME@NUMBER or NAME@ALIAS")
    return Ref(name, alias=selector)


def parse_condition(text: object) -> Condition:
    match = CONDITION.fullmatch(text) if isinstance(text, str) else None
    if not match or len(match["key"]) > METRIC_KEY_MAX:
        raise QueryError(f"invalid metric condition {shown(text)}: expected e.g. 'accuracy>=0.8' "
                         "(operators >=, <=, >, <, =, !=)")
    value = check_value(match["value"], f"invalid metric condition {shown(text)}")
    if match["dataset"] is not None:
        check_dataset(match["dataset"])
    if match["split"] is not None:
        check_split(match["split"])
    op = "=" if match["op"] == "==" else match["op"]
    return Condition(match["key"], op, value, match["dataset"], match["split"])


def parse_sort(sort: object) -> tuple[str, bool]:
    """``accuracy`` → highest first; ``-loss`` → lowest first. Returns (metric key, descending)."""
    if not isinstance(sort, str):
        raise QueryError(f"invalid sort {shown(sort)}: expected a metric name, or '-NAME' for lowest first")
    descending = not sort.startswith("-")
    key = sort[1:] if not descending else sort
    try:
        check_metric_key(key)
    except QueryError:
        raise QueryError(f"invalid sort {shown(sort)}: expected a metric name, or '-NAME' for lowest first") from None
    return key, descending
