"""Tables for people, JSON for scripts."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from hub.client import VersionInfo


# Whole numbers as typed: ASCII digits, at most 20 of them (int() would also read '١', '1_0' and ' 7').
_WHOLE = re.compile(r"-?[0-9]{1,20}")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class WholeNumber(click.IntRange):
    """click's IntRange, strict: ASCII digits only (click's INT reads '١' as 1) and within 64 bits even without
    bounds, so no option means other than what was typed or overflows a C ``long long`` (torch's seeds)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not _WHOLE.fullmatch(value):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        number = super().convert(value, param, ctx)
        if not INT64_MIN <= number <= INT64_MAX:
            self.fail(f"{number} is out of range", param, ctx)
        return number

    def _describe_range(self) -> str:
        # Unbounded options show no "x<=None" in their help.
        return "" if self.min is None and self.max is None else super()._describe_range()


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        click.echo("no matching versions", err=True)
        return
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            click.echo("  ".join("-" * width for width in widths))


def version_rows(versions: Sequence[VersionInfo], match_kinds: Sequence[str] | None = None) -> tuple[list[str], list]:
    headers = ["version", "method", "rank", "targets", "metrics", "aliases", "digest"]
    if match_kinds is not None:
        headers.insert(1, "match")
    rows = []
    for index, version in enumerate(versions):
        # The --metric syntax, so a metric on several datasets reads as several entries.
        metrics = " ".join(f"{m.key}{'@' + m.dataset if m.dataset else ''}={m.value:.4g}" for m in version.metrics)
        # "lora+rslora": the variants `--method` also finds it by.
        row = [version.ref, "+".join([version.method, *version.variants]), version.rank, ",".join(version.targets),
               metrics, ",".join(version.aliases), version.digest[:12]]
        if match_kinds is not None:
            row.insert(1, match_kinds[index])
        rows.append(row)
    return headers, rows
