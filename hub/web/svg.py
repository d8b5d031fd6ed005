"""Charts drawn on the server as inline SVG: a metric over versions, and a version's lineage graph.

Both return markup built from escaped values only (``markupsafe.escape``), ready for a template's ``|safe``. Every
plotted point carries its numbers as data attributes (``data-version``, ``data-value``...), so a reader, a script
or a test can read the chart's values without parsing coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from hub.registry.browse import Point

WIDTH, HEIGHT = 460, 150
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 12, 26


def metric_chart(key: str, dataset: str | None, split: str | None, points: Sequence[Point],
                 link: Callable[[int], str]) -> Markup:
    """A line chart of one metric (on one dataset and split) over version numbers; each point links to its
    version (``link(number)``)."""
    numbers = [p.number for p in points]
    values = [p.value for p in points]
    low_x, high_x = min(numbers), max(numbers)
    low_y, high_y = min(values), max(values)
    if high_y == low_y:  # a flat series: give it a band to sit in
        low_y, high_y = low_y - 0.5 * (abs(low_y) or 1), high_y + 0.5 * (abs(high_y) or 1)
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x(number: int) -> float:
        return MARGIN_LEFT + (plot_w / 2 if high_x == low_x else (number - low_x) / (high_x - low_x) * plot_w)

    def y(value: float) -> float:
        return MARGIN_TOP + (1 - (value - low_y) / (high_y - low_y)) * plot_h

    label = " ".join(part for part in (key, dataset and f"@{dataset}", split and f":{split}") if part)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(label)} over versions" data-metric="{escape(key)}" '
        f'data-dataset="{escape(dataset or "")}" data-split="{escape(split or "")}">',
        f'<line class="axis" x1="{MARGIN_LEFT}" y1="{HEIGHT - MARGIN_BOTTOM}" x2="{WIDTH - MARGIN_RIGHT}" '
        f'y2="{HEIGHT - MARGIN_BOTTOM}"/>',
        f'<line class="axis" x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" y2="{HEIGHT - MARGIN_BOTTOM}"/>',
        f'<text class="tick" x="{MARGIN_LEFT - 6}" y="{MARGIN_TOP + 4}" text-anchor="end">{max(values):.4g}</text>',
        f'<text class="tick" x="{MARGIN_LEFT - 6}" y="{HEIGHT - MARGIN_BOTTOM}" text-anchor="end">'
        f'{min(values):.4g}</text>',
        f'<text class="tick" x="{MARGIN_LEFT}" y="{HEIGHT - 8}">v{low_x}</text>',
        f'<text class="tick" x="{WIDTH - MARGIN_RIGHT}" y="{HEIGHT - 8}" text-anchor="end">v{high_x}</text>',
    ]
    if len(points) > 1:
        path = " ".join(f"{x(p.number):.1f},{y(p.value):.1f}" for p in points)
        parts.append(f'<polyline class="series" points="{path}"/>')
    for p in points:
        parts.append(
            f'<a href="{escape(link(p.number))}"><circle class="point" cx="{x(p.number):.1f}" cy="{y(p.value):.1f}" '
            f'r="4" data-version="{p.number}" data-value="{p.value!r}">'
            f'<title>v{p.number}: {escape(label)} = {p.value:.6g}</title></circle></a>')
    parts.append("</svg>")
    return Markup("".join(parts))


@dataclass(frozen=True)
class Node:
    """A version in a lineage graph: its column (negative: ancestors at that depth, 0: the version, 1: its
    children) and where it links to."""

    ref: str
    column: int
    href: str


@dataclass(frozen=True)
class Edge:
    """``child`` was composed from ``parent`` (with ``label``: weight and strategy)."""

    child: str
    parent: str
    label: str


NODE_W, NODE_H, COLUMN_GAP, ROW_GAP = 150, 28, 120, 14


def lineage_graph(nodes: Sequence[Node], edges: Sequence[Edge]) -> Markup:
    """Ancestors on the left (the furthest first), the version in the middle, its children on the right; an arrow
    from each parent to what was made from it, labelled with its weight and strategy. Empty without edges."""
    if not edges:
        return Markup("")
    columns = sorted({n.column for n in nodes})
    rows: dict[int, list[Node]] = {c: [n for n in nodes if n.column == c] for c in columns}
    tallest = max(len(r) for r in rows.values())
    width = len(columns) * NODE_W + (len(columns) - 1) * COLUMN_GAP + 20
    height = tallest * (NODE_H + ROW_GAP) + 20
    where: dict[str, tuple[float, float]] = {}
    for index, column in enumerate(columns):
        top = (height - len(rows[column]) * (NODE_H + ROW_GAP)) / 2
        for row, node in enumerate(rows[column]):
            where[node.ref] = (10 + index * (NODE_W + COLUMN_GAP), top + row * (NODE_H + ROW_GAP) + ROW_GAP / 2)
    parts = [f'<svg class="lineage" viewBox="0 0 {width} {height:.0f}" width="{width}" height="{height:.0f}" '
             f'role="img" aria-label="lineage graph">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"/></marker></defs>']
    for edge in edges:
        (px, py), (cx, cy) = where[edge.parent], where[edge.child]
        x1, y1, x2, y2 = px + NODE_W, py + NODE_H / 2, cx, cy + NODE_H / 2
        parts.append(f'<line class="edge" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                     f'marker-end="url(#arrow)" data-parent="{escape(edge.parent)}" '
                     f'data-child="{escape(edge.child)}"/>')
        if edge.label:
            parts.append(f'<text class="edge-label" x="{(x1 + x2) / 2:.1f}" y="{(y1 + y2) / 2 - 4:.1f}" '
                         f'text-anchor="middle">{escape(edge.label)}</text>')
    for node in nodes:
        nx, ny = where[node.ref]
        kind = "self" if node.column == 0 else ("parent" if node.column < 0 else "child")
        parts.append(f'<a href="{escape(node.href)}" class="node {kind}" data-ref="{escape(node.ref)}">'
                     f'<rect x="{nx:.1f}" y="{ny:.1f}" width="{NODE_W}" height="{NODE_H}" rx="6"/>'
                     f'<text x="{nx + NODE_W / 2:.1f}" y="{ny + NODE_H / 2 + 4:.1f}" text-anchor="middle">'
                     f'{escape(node.ref)}</text></a>')
    parts.append("</svg>")
    return Markup("".join(parts))
