"""The ``hub`` command: a thin click layer over ``hub.Hub``.

Every HubError becomes one line ``error: ...`` on stderr and exit code 1; usage errors exit 2 (click's own).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from hub.client import Hub
from hub.errors import HubError
from hub.registry import Metric

from cli.output import print_json, print_table, version_rows

METRIC_ARG = re.compile(r"^(?P<key>[A-Za-z_][\w.-]*)(@(?P<dataset>[^:=]+)(:(?P<split>[^=]+))?)?=(?P<value>.+)$")


class HubGroup(click.Group):
    """Turns the hub's own errors into one line and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HubError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


def parse_metric(text: str) -> Metric:
    """``accuracy=0.91`` or ``accuracy@gsm8k:test=0.91`` (dataset and split optional)."""
    match = METRIC_ARG.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not KEY[@DATASET[:SPLIT]]=VALUE", param_hint="--metric")
    try:
        value = float(match["value"])
    except ValueError:
        raise click.BadParameter(f"{match['value']!r} in {text!r} is not a number", param_hint="--metric") from None
    return Metric(key=match["key"], value=value, dataset=match["dataset"], split=match["split"])


@click.group(cls=HubGroup)
@click.version_option(package_name="adapter-hub")
def cli() -> None:
    """adapter hub: register, find, compose and share PEFT adapters.

    State lives in $HUB_HOME (default ~/.adapter-hub); HUB_DATABASE_URL points the registry at another database.
    """


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=str))
@click.option("--name", required=True, help="Adapter name (a line of versions).")
@click.option("--base", "base", required=True, help="Base model folder or cached Hub name it was trained on.")
@click.option("--metric", "metrics", multiple=True, help="KEY[@DATASET[:SPLIT]]=VALUE, repeatable.")
@click.option("--tag", "tags", multiple=True, help="Tag, repeatable.")
@click.option("--description", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the version as JSON.")
def register(directory: str, name: str, base: str, metrics: tuple[str, ...], tags: tuple[str, ...],
             description: str | None, as_json: bool) -> None:
    """Register the PEFT adapter in DIRECTORY as a new version of NAME."""
    parsed = [parse_metric(m) for m in metrics]
    result = Hub().register(directory, name=name, base=base, metrics=parsed, tags=tags, description=description)
    if as_json:
        print_json({**result.version.to_dict(), "created": result.created})
        return
    verb = "registered" if result.created else "already registered as"
    click.echo(f"{verb} {result.version.ref} ({result.version.method}, digest {result.version.digest[:12]})")


@cli.command(name="list")
@click.option("--compatible-with", "compatible_with", default=None, help="Base model folder or name.")
@click.option("--base", "weights_hash", default=None, help="Base weights_hash.")
@click.option("--name", default=None, help="Only this adapter's versions.")
@click.option("--method", default=None)
@click.option("--min-rank", type=int, default=None)
@click.option("--max-rank", type=int, default=None)
@click.option("--where", "where", multiple=True, help="Metric condition such as 'accuracy>=0.8', repeatable.")
@click.option("--tag", "tags", multiple=True)
@click.option("--sort", default=None, help="Metric to sort by, best (highest) first; '-METRIC' for lowest first.")
@click.option("--all", "include_yanked", is_flag=True, help="Include yanked versions.")
@click.option("--json", "as_json", is_flag=True)
def list_(compatible_with: str | None, weights_hash: str | None, name: str | None, method: str | None,
          min_rank: int | None, max_rank: int | None, where: tuple[str, ...], tags: tuple[str, ...],
          sort: str | None, include_yanked: bool, as_json: bool) -> None:
    """List registered versions, optionally only those compatible with a base."""
    hub = Hub()
    filters = dict(name=name, method=method, min_rank=min_rank, max_rank=max_rank, where=where, tags=tags,
                   sort=sort, include_yanked=include_yanked)
    if compatible_with:
        matches = hub.compatible(compatible_with, **filters)
        versions = [m.version for m in matches]
        match_kinds = ["exact" if m.exact else "structural" for m in matches]
    else:
        versions = hub.list(weights_hash=weights_hash, **filters)
        match_kinds = None
    if as_json:
        rows = [v.to_dict() for v in versions]
        for row, kind in zip(rows, match_kinds or [], strict=False):
            row["match"] = kind
        print_json(rows)
        return
    print_table(*version_rows(versions, match_kinds))


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def show(ref: str, as_json: bool) -> None:
    """Show one version: NAME, NAME@3 or NAME@ALIAS."""
    version = Hub().get(ref)
    data = version.to_dict()
    if as_json:
        print_json(data)
        return
    for key in ("ref", "method", "rank", "alpha", "targets", "digest", "base_name", "status", "created"):
        value = data.get(key)
        click.echo(f"{key:>10}: {', '.join(value) if isinstance(value, list) else value}")
    if version.base is not None:
        click.echo(f"{'base':>10}: weights {version.base.weights_hash[:16]}  shapes {version.base.shape_hash[:16]}")
    if version.aliases:
        click.echo(f"{'aliases':>10}: {', '.join(version.aliases)}")
    for metric in version.metrics:
        where = "".join(f" [{part}]" for part in (metric.dataset, metric.split) if part)
        click.echo(f"{'metric':>10}: {metric.key} = {metric.value:g}{where}")
    for parent in version.parents:
        click.echo(f"{'parent':>10}: {parent.name}@{parent.number} weight={parent.weight} ({parent.strategy})")


@cli.command()
@click.argument("ref")
@click.argument("alias")
def alias(ref: str, alias: str) -> None:
    """Point ALIAS (e.g. prod) at the version REF (NAME@VERSION)."""
    version = Hub().registry.set_alias(ref, alias)
    click.echo(f"{version.name}@{alias} -> {version.ref}")


@cli.command()
@click.argument("ref")
def yank(ref: str) -> None:
    """Hide a version from lists and @latest (it stays reachable by number)."""
    version = Hub().registry.yank(ref)
    click.echo(f"yanked {version.ref}")


@cli.command()
@click.argument("ref")
@click.argument("directory", type=click.Path(path_type=str))
def export(ref: str, directory: str) -> None:
    """Write version REF as a PEFT adapter folder DIRECTORY."""
    path = Hub().export(ref, directory)
    click.echo(f"exported {ref} to {path}")


@cli.command(name="fingerprint")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
def fingerprint_(model: str, as_json: bool) -> None:
    """Print the weights_hash and shape_hash of a base MODEL (folder or cached Hub name)."""
    fp = Hub().fingerprint(model)
    if as_json:
        print_json({"weights_hash": fp.weights_hash, "shape_hash": fp.shape_hash,
                    "architecture": fp.architecture, "num_parameters": fp.num_parameters})
        return
    click.echo(f"weights_hash  {fp.weights_hash}\nshape_hash    {fp.shape_hash}")
    click.echo(f"architecture  {fp.architecture}\nparameters    {fp.num_parameters:,}")


@cli.group()
def db() -> None:
    """Registry database schema (alembic migrations)."""


@db.command()
def upgrade() -> None:
    """Bring the registry database to the current schema."""
    from hub.registry import upgrade as run_upgrade

    url = Hub().settings.database_url
    revision = run_upgrade(url)
    click.echo(f"database at revision {revision}")


@db.command()
def current() -> None:
    """Print the registry database's schema revision."""
    from hub.registry import current_revision, head_revision

    url = Hub().settings.database_url
    revision = current_revision(url)
    head = head_revision()
    state = "up to date" if revision == head else f"head is {head}; run `hub db upgrade`"
    click.echo(f"{revision or 'empty'} ({state})")

