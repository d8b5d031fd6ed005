"""Tables for people, JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from hub.client import VersionInfo


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
