"""The ``hub`` command: a thin click layer over ``hub.Hub``; each command is a few lines over one of its methods.

Every HubError becomes one line ``error: ...`` on stderr and exit code 1 (secrets scrubbed); usage errors exit 2
(click's own). Anything else is a bug: one line ``error: internal error ...`` and exit code 70, the traceback only
with HUB_DEBUG=1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import traceback
from dataclasses import asdict
from typing import Any

import click

from cli.compose import compose
from cli.evaluate import evaluate_command
from cli.output import WholeNumber, print_json, print_table, version_rows
from cli.rank import rank
from cli.serve import serve
from cli.train import train
from cli.web import diff, search, ui
from hub.client import Hub, Query, parse_metric, parse_remote_ref
from hub.errors import HubError, QueryError
from hub.secrets import scrub

INTERNAL_ERROR = 70  # EX_SOFTWARE
LIST_LIMIT = 100  # what `hub list` shows unless told otherwise
STREAM_PAGE = 1000  # versions per query when `hub list --all` streams


class HubGroup(click.Group):
    """Turns every failure into one scrubbed line and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HubError as exc:
            click.echo(f"error: {scrub(str(exc))}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # The reader went away (`hub list | head`): nothing more to say, and nobody to say it to.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except OSError as exc:
            # A local file problem the hub did not foresee: say what failed, not where in the code.
            what = exc.strerror or type(exc).__name__
            click.echo(f"error: {scrub(what)}{f': {exc.filename}' if exc.filename else ''}", err=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("HUB_DEBUG"):
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            click.echo(f"error: internal error ({type(exc).__name__}: {scrub(first)[:300]}); "
                       f"HUB_DEBUG=1 shows the traceback", err=True)
            sys.exit(INTERNAL_ERROR)


class _OneLine(logging.Formatter):
    """``note: ...`` (info) and ``warning: ...`` lines, scrubbed of secrets."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "note" if record.levelno < logging.WARNING else record.levelname.lower()
        return f"{prefix}: {scrub(record.getMessage())}"


def _setup_logging() -> None:
    """The hub's notes and warnings as plain lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("hub")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def metric_option(texts: tuple[str, ...]) -> list[Any]:
    try:
        return [parse_metric(text) for text in texts]
    except QueryError as exc:
        raise click.BadParameter(str(exc), param_hint="--metric") from None


@click.group(cls=HubGroup)
@click.version_option(package_name="adapter-hub")
def cli() -> None:
    """adapter hub: register, find, compose and share PEFT adapters.

    State lives in $HUB_HOME (default ~/.adapter-hub); HUB_DATABASE_URL points the registry at another database,
    HUB_STORE the artifact store at another folder (shared storage).
    """
    _setup_logging()


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=str))
@click.option("--name", required=True, help="Adapter name (a line of versions).")
@click.option("--base", "base", required=True, help="Base model folder or Hub id it was trained on.")
@click.option("--metric", "metrics", multiple=True, help="KEY[@DATASET[:SPLIT]]=VALUE, repeatable.")
@click.option("--tag", "tags", multiple=True, help="Tag, repeatable.")
@click.option("--description", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the version as JSON.")
def register(directory: str, name: str, base: str, metrics: tuple[str, ...], tags: tuple[str, ...],
             description: str | None, as_json: bool) -> None:
    """Register the PEFT adapter in DIRECTORY as a new version of NAME."""
    result = Hub().register(directory, name=name, base=base, metrics=metric_option(metrics), tags=tags,
                            description=description)
    if as_json:
        print_json({**result.version.to_dict(), "created": result.created})
        return
    verb = "registered" if result.created else "already registered as"
    click.echo(f"{verb} {result.version.ref} ({result.version.method}, digest {result.version.digest[:12]})")


@cli.command(name="import")
@click.argument("directories", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=str))
@click.option("--base", "base", required=True, help="Base model folder or Hub id they were trained on.")
@click.option("--name", default=None, help="Register all as versions of NAME, in the order given (default: each "
              "folder's own name).")
@click.option("--metric", "metrics", multiple=True, help="KEY[@DATASET[:SPLIT]]=VALUE for every version, repeatable.")
@click.option("--tag", "tags", multiple=True, help="Tag for every version, repeatable.")
@click.option("--description", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
def import_(directories: tuple[str, ...], base: str, name: str | None, metrics: tuple[str, ...],
            tags: tuple[str, ...], description: str | None, as_json: bool) -> None:
    """Register many PEFT adapter folders at once (a few transactions, folders hashed in parallel)."""
    results = Hub().register_many(list(directories), base=base, name=name, metrics=metric_option(metrics), tags=tags,
                                  description=description)
    if as_json:
        print_json([{**r.version.to_dict(), "created": r.created} for r in results])
        return
    for result in results:
        click.echo(f"{'registered' if result.created else 'already registered as'} {result.version.ref}")
    click.echo(f"{sum(r.created for r in results)} new versions of {len(results)} folders", err=True)


@cli.command(name="list")
@click.option("--compatible-with", "compatible_with", default=None, help="Base model folder or name.")
@click.option("--remote", "remote_repo", default=None, help="List a Hub repo's versions from their cards (ORG/NAME).")
@click.option("--base", "weights_hash", default=None, help="Base weights_hash.")
@click.option("--name", default=None, help="Only this adapter's versions.")
@click.option("--method", default=None)
@click.option("--min-rank", type=WholeNumber(), default=None, help="Only versions of at least this rank.")
@click.option("--max-rank", type=WholeNumber(), default=None, help="Only versions of at most this rank.")
@click.option("--where", "where", multiple=True, help="Metric condition such as 'accuracy>=0.8', repeatable.")
@click.option("--tag", "tags", multiple=True)
@click.option("--sort", default=None, help="Metric to sort by, best (highest) first; '-METRIC' for lowest first.")
@click.option("--yanked", "--include-yanked", "include_yanked", is_flag=True, help="Include yanked versions.")
@click.option("--limit", type=WholeNumber(), default=LIST_LIMIT, show_default=True,
              help="Show at most this many versions.")
@click.option("--after", default=None, help="Continue after this cursor (printed when more versions match).")
@click.option("--all", "everything", is_flag=True, help="Every matching version, fetched page by page.")
@click.option("--folders", is_flag=True, help="With --remote ORG/NAME[@REV]: the folders holding an adapter.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.option("--jsonl", "as_jsonl", is_flag=True, help="JSON Lines, one version per line, printed as they come.")
def list_(compatible_with: str | None, remote_repo: str | None, weights_hash: str | None, name: str | None,
          method: str | None, min_rank: int | None, max_rank: int | None, where: tuple[str, ...], tags: tuple[str, ...],
          sort: str | None, include_yanked: bool, limit: int, after: str | None, everything: bool, folders: bool,
          as_json: bool, as_jsonl: bool) -> None:
    """List registered versions, optionally only those compatible with a base.

    At most --limit versions (a note on stderr says how to see more); --all streams every one.
    """
    hub = Hub()
    if remote_repo:
        _list_remote(hub, remote_repo, compatible_with, folders, as_json)
        return
    if folders:
        raise click.UsageError("--folders lists the adapters of a --remote repo")
    if as_json and as_jsonl:
        raise click.UsageError("--json and --jsonl are two formats: choose one")
    query = Query(name=name, method=method, min_rank=min_rank, max_rank=max_rank, where=where, tags=tags, sort=sort,
                  include_yanked=include_yanked, weights_hash=weights_hash, after=after,
                  limit=STREAM_PAGE if everything else limit)
    base = hub.fingerprint(compatible_with) if compatible_with else None
    rows: list[tuple[Any, str | None]] = []  # (version, match kind)
    while True:
        if base is not None:
            matches = hub.compatible(base, query)
            page = [(m.version, "exact" if m.exact else "structural") for m in matches]
            next_after = matches.next_after
        else:
            versions = hub.list(query)
            page, next_after = [(v, None) for v in versions], versions.next_after
        if as_jsonl:
            for version, kind in page:
                click.echo(json.dumps({**version.to_dict(), **({"match": kind} if kind else {})}, default=str))
        else:
            rows += page
        if not everything or next_after is None:
            break
        query = dataclasses.replace(query, after=next_after)
    if not as_jsonl:
        if as_json:
            print_json([{**v.to_dict(), **({"match": kind} if kind else {})} for v, kind in rows])
        else:
            print_table(*version_rows([v for v, _ in rows], [k or "" for _, k in rows] if base is not None else None))
    if next_after is not None and not everything:
        click.echo(f"note: more versions match; the next {limit}: --after {next_after} (every one: --all)", err=True)


def _list_remote(hub: Hub, repo: str, compatible_with: str | None, folders: bool, as_json: bool) -> None:
    remote = hub.remote()
    if folders:
        repo_id, _, revision = repo.partition("@")
        found = remote.adapters(repo_id, revision or None)
        if as_json:
            print_json(found)
        else:
            for folder in found:
                click.echo(folder or "(root)")
        return
    base = hub.fingerprint(compatible_with) if compatible_with else None
    remote_versions = remote.versions(repo, base=base)
    if as_json:
        print_json([asdict(v) for v in remote_versions])
        return
    print_table(["tag", "version", "method", "rank", "match", "base", "digest", "problem"],
                [[v.tag, f"{v.name}@{v.number}" if v.name else "", v.method, v.rank, v.match or "",
                  v.base_model or (v.base.weights_hash[:12] if v.base else "unknown"), (v.digest or "")[:12],
                  v.problem or ""] for v in remote_versions])


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def show(ref: str, as_json: bool) -> None:
    """Show one version: NAME, NAME@3 or NAME@ALIAS, with where it was pushed."""
    hub = Hub()
    version = hub.get(ref)
    remotes = hub.remotes(version.ref)
    data = version.to_dict()
    if as_json:
        print_json({**data, "remotes": [r.to_dict() for r in remotes]})
        return
    for key in ("ref", "method", "variants", "rank", "alpha", "targets", "digest", "base_name", "status", "created"):
        value = data.get(key)
        if value != []:  # no variants: no line
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
    for remote in remotes:
        click.echo(f"{'remote':>10}: {remote.repo_id}@{remote.tag} ({remote.commit[:12]})")


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def lineage(ref: str, as_json: bool) -> None:
    """Every ancestor of REF, nearest first: what it was composed or continued from."""
    edges = Hub().lineage(ref)
    if as_json:
        print_json([{"child": e.child, "depth": e.depth, "position": e.position, "parent": e.parent.to_dict()}
                    for e in edges])
        return
    if not edges:
        click.echo(f"{ref} has no recorded parents", err=True)
    for edge in edges:
        p = edge.parent
        click.echo(f"{'  ' * (edge.depth - 1)}{edge.child} <- {p.ref} weight={p.weight:g} ({p.strategy})")


@cli.command()
@click.argument("ref")
@click.argument("alias")
@click.option("--json", "as_json", is_flag=True)
def alias(ref: str, alias: str, as_json: bool) -> None:
    """Point ALIAS (e.g. prod) at the version REF (NAME@VERSION)."""
    version = Hub().alias(ref, alias)
    if as_json:
        print_json(version.to_dict())
        return
    click.echo(f"{version.name}@{alias} -> {version.ref}")


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def unalias(ref: str, as_json: bool) -> None:
    """Remove the alias NAME@ALIAS (the version stays)."""
    name, sep, alias_name = ref.partition("@")
    if not sep or not alias_name:
        raise QueryError(f"{ref!r} is not NAME@ALIAS")
    Hub().unalias(name, alias_name)
    if as_json:
        print_json({"name": name, "alias": alias_name, "removed": True})
        return
    click.echo(f"removed alias {name}@{alias_name}")


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def yank(ref: str, as_json: bool) -> None:
    """Hide a version from lists and @latest (it stays reachable by number)."""
    version = Hub().yank(ref)
    if as_json:
        print_json(version.to_dict())
        return
    click.echo(f"yanked {version.ref}")


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def unyank(ref: str, as_json: bool) -> None:
    """Show a yanked version in lists and @latest again."""
    version = Hub().unyank(ref)
    if as_json:
        print_json(version.to_dict())
        return
    click.echo(f"unyanked {version.ref}")


@cli.command()
@click.argument("ref")
@click.option("--force", is_flag=True, help="Delete even when other versions' lineage names it (their link goes).")
@click.option("--json", "as_json", is_flag=True)
def delete(ref: str, force: bool, as_json: bool) -> None:
    """Delete version REF (NAME@N or NAME@ALIAS) and, when nothing else needs it, its artifact."""
    report = Hub().delete(ref, force=force)
    if as_json:
        print_json(report.to_dict())
        return
    click.echo(f"deleted {report.deleted.version.ref} (freed {report.freed_bytes:,} bytes)")


@cli.command()
@click.option("--yes", "remove", is_flag=True, help="Remove what is listed (default: only list it).")
@click.option("--json", "as_json", is_flag=True)
def gc(remove: bool, as_json: bool) -> None:
    """List (or with --yes remove) store entries no version references, abandoned temporary folders and stale
    download files."""
    report = Hub().gc(dry_run=not remove)
    if as_json:
        print_json(report.to_dict())
        return
    for entry in report.entries:
        click.echo(f"{entry.kind:<9} {entry.size_bytes:>12,}  {entry.path}")
    verb = "would free" if report.dry_run else "freed"
    click.echo(f"{len(report.entries)} entries, {verb} {report.size_bytes:,} bytes"
               f"{'' if not report.dry_run else ' (run with --yes to remove them)'}", err=True)


@cli.command()
@click.argument("ref")
@click.argument("directory", type=click.Path(path_type=str))
@click.option("--for", "target", type=click.Choice(["peft", "vllm"]), default="peft", show_default=True,
              help="vllm: one plain LoRA at one of vLLM's ranks (LoRA-family versions, sums, stacks).")
@click.option("--base-model", default=None, help="With --for vllm: the model id vLLM serves (default: the base's "
              "Hub id).")
@click.option("--json", "as_json", is_flag=True)
def export(ref: str, directory: str, target: str, base_model: str | None, as_json: bool) -> None:
    """Write version REF as a PEFT adapter folder DIRECTORY."""
    if target == "vllm":
        result = Hub().export_for_vllm(ref, directory, base_model=base_model)
        if as_json:
            print_json(result.to_dict())
            return
        reduced = f", reduced by SVD from rank {result.source_rank}" if result.reduced else ""
        click.echo(f"exported {result.ref} for vLLM to {result.path}: rank {result.rank}{reduced}, "
                   f"{result.modules} modules, relative error {result.relative_error:.2e}; serve it with "
                   f"--enable-lora --max-lora-rank {result.rank} on {result.base_model}")
        return
    path = Hub().export(ref, directory)
    if as_json:
        print_json({"ref": ref, "path": str(path)})
        return
    click.echo(f"exported {ref} to {path}")


@cli.command()
@click.argument("ref")
@click.option("--repo", "repo_id", default=None, help="ORG/NAME (default: <your user or $HUB_REMOTE_NAMESPACE>/NAME).")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--base-model", default=None, help="The base's Hub model id for the card (ORG/NAME).")
@click.option("--json", "as_json", is_flag=True)
def push(ref: str, repo_id: str | None, private: bool, base_model: str | None, as_json: bool) -> None:
    """Push version REF to the Hub as a commit tagged v<N> (HF_ENDPOINT, HF_TOKEN apply)."""
    options: dict[str, Any] = {"private": private}
    if base_model:
        options["base_model"] = base_model
    result = Hub().push(ref, repo_id, **options)
    if as_json:
        print_json(asdict(result))
        return
    state = "pushed" if result.uploaded else "already on the Hub:"
    click.echo(f"{state} {result.ref} -> {result.repo_id}@{result.tag} ({result.commit[:12]})")


@cli.command()
@click.argument("repo")
@click.option("--name", default=None, help="Register under this name instead of the card's or the repo's.")
@click.option("--subfolder", default=None, help="The adapter's folder inside the repo (as PEFT's subfolder=).")
@click.option("--all-versions", is_flag=True, help="Every v<N> tag of ORG/NAME not already here, oldest first.")
@click.option("--json", "as_json", is_flag=True)
def pull(repo: str, name: str | None, subfolder: str | None, all_versions: bool, as_json: bool) -> None:
    """Pull ORG/NAME[/FOLDER][@REVISION] (a tag such as v2, a branch or a commit), verify it and register it."""
    repo_id, folder, revision = parse_remote_ref(repo)
    if all_versions:
        if folder or subfolder or revision:
            raise click.UsageError("--all-versions takes ORG/NAME alone (every version tag of the repo)")
        results = Hub().pull_versions(repo_id, name=name)
        if as_json:
            print_json([{**asdict(r), "version": r.version.to_dict()} for r in results])
            return
        for result in results:
            click.echo(f"pulled {result.version.ref} from {result.repo_id}@{result.revision} ({result.commit[:12]})")
        click.echo(f"{len(results)} new version(s) from {repo_id}", err=True)
        return
    if subfolder and folder and subfolder != folder:
        raise QueryError(f"{repo!r} names folder {folder!r} and --subfolder says {subfolder!r}")
    result = Hub().pull(repo_id, revision, name=name, subfolder=subfolder or folder)
    if as_json:
        print_json({**asdict(result), "version": result.version.to_dict()})
        return
    state = "pulled" if result.created else "already registered:"
    click.echo(f"{state} {result.version.ref} from {result.repo_id}@{result.revision} ({result.commit[:12]})")


@cli.command(name="fingerprint")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
def fingerprint_(model: str, as_json: bool) -> None:
    """Print the weights_hash and shape_hash of a base MODEL (a folder, or a Hub id: downloaded once)."""
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
cli.add_command(rank)
cli.add_command(ui)
cli.add_command(search)
cli.add_command(diff)
cli.add_command(serve)


@cli.group()
def db() -> None:
    """Registry database schema (alembic migrations)."""


@db.command()
@click.option("--json", "as_json", is_flag=True)
def upgrade(as_json: bool) -> None:
    """Bring the registry database to the current schema."""
    revision = Hub().upgrade_database()
    if as_json:
        print_json({"revision": revision})
        return
    click.echo(f"database at revision {revision}")


@db.command()
@click.option("--json", "as_json", is_flag=True)
def current(as_json: bool) -> None:
    """Print the registry database's schema revision."""
    status = Hub().database_status()
    if as_json:
        print_json(status.to_dict())
        return
    click.echo(f"{status.revision or 'empty'} ({status.advice})")
