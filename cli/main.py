"""The ``hub`` command: a thin click layer over ``hub.Hub``.

Every HubError becomes one line ``error: ...`` on stderr and exit code 1; usage errors exit 2 (click's own).
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict
from typing import Any

import click

from cli.compose import compose
from cli.evaluate import evaluate_command
from cli.output import print_json, print_table, version_rows
from cli.train import train
from hub.client import Hub
from hub.errors import HubError
from hub.registry import Metric
from hub.remote import Remote

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
@click.option("--remote", "remote_repo", default=None, help="List a Hub repo's versions from their cards (ORG/NAME).")
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
def list_(compatible_with: str | None, remote_repo: str | None, weights_hash: str | None, name: str | None,
          method: str | None, min_rank: int | None, max_rank: int | None, where: tuple[str, ...], tags: tuple[str, ...],
          sort: str | None, include_yanked: bool, as_json: bool) -> None:
    """List registered versions, optionally only those compatible with a base."""
    hub = Hub()
    if remote_repo:
        base = hub.fingerprint(compatible_with) if compatible_with else None
        remote_versions = Remote(hub).versions(remote_repo, base=base)
        if as_json:
            print_json([asdict(v) for v in remote_versions])
        else:
            print_table(["tag", "version", "method", "rank", "match", "base", "digest"],
                        [[v.tag, f"{v.name}@{v.number}", v.method, v.rank, v.match or "",
                          v.base_model or (v.base.weights_hash[:12] if v.base else "unknown"), (v.digest or "")[:12]]
                         for v in remote_versions])
        return
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


@cli.command()
@click.argument("ref")
@click.option("--repo", "repo_id", default=None, help="ORG/NAME (default: <your user or $HUB_REMOTE_NAMESPACE>/NAME).")
@click.option("--private", is_flag=True, help="Create the repository as private.")
def push(ref: str, repo_id: str | None, private: bool) -> None:
    """Push version REF to the Hub as a commit tagged v<N> (HF_ENDPOINT, HF_TOKEN apply)."""
    result = Remote(Hub()).push(ref, repo_id, private=private)
    state = "pushed" if result.uploaded else "already on the Hub:"
    click.echo(f"{state} {result.ref} -> {result.repo_id}@{result.tag} ({result.commit[:12]})")


@cli.command()
@click.argument("repo")
@click.option("--name", default=None, help="Register under this name instead of the card's or the repo's.")
def pull(repo: str, name: str | None) -> None:
    """Pull ORG/NAME[@REVISION] (a tag such as v2, a branch or a commit), verify it and register it."""
    repo_id, _, revision = repo.partition("@")
    result = Remote(Hub()).pull(repo_id, revision or None, name=name)
    state = "pulled" if result.created else "already registered:"
    click.echo(f"{state} {result.version.ref} from {result.repo_id}@{result.revision} ({result.commit[:12]})")


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


# The model commands live in their own modules; they import torch only when they run.
cli.add_command(train)
cli.add_command(evaluate_command)
cli.add_command(compose)


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

