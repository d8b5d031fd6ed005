"""``hub ui`` (the registry's web pages), ``hub search`` and ``hub diff``."""

from __future__ import annotations

import os

import click

from cli.output import WholeNumber, print_json, print_table, version_rows
from hub.client import Hub, Query

# Modules shown by `hub diff` without --json: the ones that differ most.
TOP_MODULES = 10


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=WholeNumber(0, 65535))
@click.option("--api-key", default=None, help="Allow alias moves and yanks from the pages to whoever gives this key "
                                              "(default $HUB_API_KEY; without one the pages are read-only).")
@click.option("--json", "as_json", is_flag=True, help="Print the address as JSON when listening.")
def ui(host: str, port: int, api_key: str | None, as_json: bool) -> None:
    """Browse the registry in a web browser: search, versions, metrics, lineage, compare. Loads no model."""
    import uvicorn

    app = Hub().web_app(api_key=api_key or os.environ.get("HUB_API_KEY") or None)
    url = f"http://{host}:{port}/"
    if as_json:
        print_json({"url": url})
    else:
        click.echo(f"registry pages at {url} (Ctrl-C stops)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@click.command()
@click.argument("text")
@click.option("--method", default=None)
@click.option("--base", "weights_hash", default=None, help="Base weights_hash.")
@click.option("--where", "where", multiple=True, help="Metric condition such as 'accuracy>=0.8', repeatable.")
@click.option("--tag", "tags", multiple=True)
@click.option("--all", "include_yanked", is_flag=True, help="Include yanked versions.")
@click.option("--limit", default=50, show_default=True, type=WholeNumber(1, 10_000))
@click.option("--after", default=None, help="The cursor a previous page printed, for the next page.")
@click.option("--json", "as_json", is_flag=True)
def search(text: str, method: str | None, weights_hash: str | None, where: tuple[str, ...], tags: tuple[str, ...],
           include_yanked: bool, limit: int, after: str | None, as_json: bool) -> None:
    """Find versions by words in their names, descriptions, tags, metric names and cards; the adapter named TEXT
    first, then names holding the words, then the rest."""
    query = Query(method=method, where=where, tags=tags, include_yanked=include_yanked, weights_hash=weights_hash,
                  limit=limit, after=after)
    hits = Hub().search(text, query)
    if as_json:
        print_json({"results": [hit.to_dict() for hit in hits], "next_after": hits.next_after})
        return
    print_table(*version_rows([hit.version for hit in hits], [hit.match for hit in hits]))
    if hits.next_after:
        click.echo(f"more: hub search {text!r} --after {hits.next_after}", err=True)


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True)
def diff(a: str, b: str, as_json: bool) -> None:
    """Compare versions A and B: fields, config, recipe, metrics (B − A), tags, and their weight updates per
    module, computed from the factors (‖ΔA‖, ‖ΔB‖, ‖ΔA−ΔB‖, cosine)."""
    result = Hub().diff(a, b)
    if as_json:
        print_json(result.to_dict())
        return
    click.echo(f"A = {result.a.ref}   B = {result.b.ref}" + ("   (same artifact)" if result.same_artifact else ""))
    for title, changes in (("field", result.fields), ("config", result.config), ("recipe", result.recipe)):
        for change in changes:
            click.echo(f"{title:>7}  {change.key}: {change.a!r} -> {change.b!r}")
    for metric in result.metrics:
        where = "".join(part for part in (metric.dataset and f"@{metric.dataset}",
                                          metric.split and f":{metric.split}") if part)
        shown = " ".join(f"{side}={value:.4g}" for side, value in (("A", metric.a), ("B", metric.b))
                         if value is not None)
        delta = f"  ({metric.delta:+.4g})" if metric.delta is not None else ""
        click.echo(f" metric  {metric.key}{where}: {shown}{delta}")
    if result.tags_only_a or result.tags_only_b:
        only_a, only_b = ", ".join(result.tags_only_a) or "-", ", ".join(result.tags_only_b) or "-"
        click.echo(f"   tags  only A: {only_a}; only B: {only_b}")
    weights = result.weights
    if weights is None:
        click.echo(f"weights not compared: {result.weights_refused}")
        return
    cosine = "-" if weights.cosine is None else f"{weights.cosine:.4f}"
    click.echo(f"weights  ‖ΔA‖={weights.norm_a:.4g}  ‖ΔB‖={weights.norm_b:.4g}  ‖ΔA−ΔB‖={weights.norm_diff:.4g}  "
               f"cosine={cosine}")
    print_table(["module", "‖ΔA‖", "‖ΔB‖", "‖ΔA−ΔB‖", "cosine", "via"],
                [[m.module, f"{m.norm_a:.4g}", f"{m.norm_b:.4g}", f"{m.norm_diff:.4g}",
                  "-" if m.cosine is None else f"{m.cosine:.4f}", m.via] for m in weights.modules[:TOP_MODULES]])
    if len(weights.modules) > TOP_MODULES:
        click.echo(f"({len(weights.modules) - TOP_MODULES} more modules: --json lists them all)", err=True)
