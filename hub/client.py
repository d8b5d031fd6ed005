"""The Python front door: ``Hub`` ties the artifact store, the registry and base fingerprints together."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.config import Settings, load_settings
from hub.errors import HubError, InvalidArtifact, NotFound, QueryError
from hub.fingerprint import Fingerprint, fingerprint
from hub.formats import Adapter, adapter_digest, export_adapter, read_adapter
from hub.lifecycle import member_digests, store_and_register
from hub.methods.fit import check_fit, stored_fit
from hub.registry import (
    BaseInfo,
    LineageEdge,
    Match,
    Metric,
    NewVersion,
    Page,
    Parent,
    Registered,
    Registry,
    VersionInfo,
)
from hub.registry import Remote as RemoteRecord
from hub.registry.refs import check_description, check_int, check_name
from hub.store import Store

if TYPE_CHECKING:
    from hub.data import Example
    from hub.diff import Diff
    from hub.export_vllm import VllmExport
    from hub.lifecycle import DeleteReport, GcReport
    from hub.rank import Ranked
    from hub.registry import SchemaStatus
    from hub.registry.search import SearchHit
    from hub.remote import PullResult, PushResult
    from hub.remote import Remote as RemoteClient
    from hub.train import Recipe

__all__ = ["Evaluation", "Hub", "Metric", "Parent", "Query", "Trained", "check_name", "parse_metric",
           "parse_remote_ref", "resolve_base"]

log = logging.getLogger(__name__)

BaseLike = Fingerprint | str | os.PathLike[str] | Any
SMOLLM2 = "smollm2"  # shortcut for the cached SmolLM2-135M-Instruct folder (hub.runtime.pretrained)
# Versions per transaction in register_many: large enough to amortize commits, small enough to hold its locks.
BATCH_SIZE = 500
METRIC_ARG = re.compile(r"^(?P<key>[A-Za-z_][\w.-]*)(@(?P<dataset>[^:=]+)(:(?P<split>[^=]+))?)?=(?P<value>.+)$")


@dataclass(frozen=True)
class Query:
    """The filters ``Hub.list`` and ``Hub.compatible`` take, all optional and combined with AND.

    ``where``: metric conditions (``accuracy>=0.8``, ``accuracy@gsm8k:test>=0.8``); ``tags``: all of them;
    ``sort``: a metric, highest first (``-metric``: lowest first); ``weights_hash``: only versions on that base
    (``list`` only; ``compatible`` takes the base itself). ``limit`` and ``after`` page through the results: pass
    a page's ``next_after`` as ``after`` (with the same filters) for the page that follows.
    """

    name: str | None = None
    method: str | None = None
    min_rank: int | str | None = None  # a string must be ASCII digits (what a command line gives)
    max_rank: int | str | None = None
    where: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    sort: str | None = None
    include_yanked: bool = False
    limit: int | None = None
    weights_hash: str | None = None
    after: str | None = None

    def filters(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "min_rank": self.min_rank, "max_rank": self.max_rank,
                "where": tuple(self.where), "tags": tuple(self.tags), "sort": self.sort,
                "include_yanked": self.include_yanked, "limit": self.limit, "after": self.after}


@dataclass(frozen=True)
class Trained:
    """What ``Hub.train`` produced: the registered version, the loss per optimizer step, seconds, metrics."""

    registered: Registered
    losses: list[float]
    seconds: float
    metrics: list[Metric] = field(default_factory=list)


@dataclass(frozen=True)
class Evaluation:
    """One version's scores on one dataset (``ref`` is ``(base)`` for the bare base)."""

    ref: str
    dataset: str
    split: str
    count: int
    metrics: dict[str, float]
    base_check: str | None = None  # how the base was recognised as the version's (exact, structural)

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "dataset": self.dataset, "split": self.split, "count": self.count,
                "metrics": self.metrics, "base_check": self.base_check}


def parse_metric(text: str) -> Metric:
    """``accuracy=0.91`` or ``accuracy@gsm8k:test=0.91`` (dataset and split optional). Raises QueryError."""
    match = METRIC_ARG.fullmatch(text)
    if not match:
        raise QueryError(f"metric {text!r} is not KEY[@DATASET[:SPLIT]]=VALUE")
    try:
        value = float(match["value"])
    except ValueError:
        raise QueryError(f"metric value {match['value']!r} in {text!r} is not a number") from None
    return Metric(key=match["key"], value=value, dataset=match["dataset"], split=match["split"])


def parse_remote_ref(text: str) -> tuple[str, str | None, str | None]:
    """``ORG/NAME[/FOLDER][@REVISION]`` → (repo_id, folder or None, revision or None). Raises QueryError."""
    from hub.remote import parse_remote_ref

    return parse_remote_ref(text)


def resolve_base(name_or_path: str | os.PathLike[str]) -> Path:
    """A base model folder: ``smollm2`` (converted and cached on first use), a folder, or a Hub model id."""
    from hub.runtime.load import local_path
    from hub.runtime.pretrained import smollm2_path

    if name_or_path == SMOLLM2 and not Path(name_or_path).exists():
        return smollm2_path()
    return local_path(name_or_path)


class Hub:
    """One hub: a store of artifacts and the registry that indexes them.

    ``home`` (default $HUB_HOME, or ~/.adapter-hub) holds the store and the SQLite registry; ``database_url``
    (default $HUB_DATABASE_URL) and ``store`` (default $HUB_STORE) put either elsewhere.

    >>> hub = Hub()
    >>> hub.register("out/math-lora", name="math", base="models/smollm2", metrics={"accuracy": 0.91})
    >>> [m.version.ref for m in hub.compatible("models/smollm2")]
    """

    def __init__(self, *, home: str | os.PathLike[str] | None = None, database_url: str | None = None,
                 store: str | os.PathLike[str] | None = None) -> None:
        settings = load_settings()
        if home is not None:
            home = Path(home)
            settings = Settings(home=home, database_url=database_url or f"sqlite:///{home / 'registry.db'}")
        elif database_url is not None:
            settings = Settings(home=settings.home, database_url=database_url, store=settings.store)
        if store is not None:
            settings = Settings(home=settings.home, database_url=settings.database_url, store=Path(store))
        self.settings = settings
        self.store = Store(settings.store_dir)
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        # Opened on first use so commands that need no database (fingerprint, export of a folder) never touch it.
        if self._registry is None:
            self._registry = Registry(self.settings.database_url)
        return self._registry

    def register(
        self,
        source: str | os.PathLike[str] | Adapter,
        *,
        name: str,
        base: BaseLike | None,
        base_name: str | None = None,
        metrics: Mapping[str, float] | Iterable[Metric] = (),
        tags: Iterable[str] = (),
        lineage: Iterable[Parent] = (),
        description: str | None = None,
        number: int | None = None,
        recipe: Mapping[str, Any] | None = None,
    ) -> Registered:
        """Validate an adapter (a PEFT folder or an in-memory Adapter), store it and register a version.

        Registering the same content under the same name again returns the existing version. ``number`` keeps
        a version number chosen elsewhere (a pull keeps the number the publisher gave it).
        """
        adapter = source if isinstance(source, Adapter) else read_adapter(source)
        base_fp = self.fingerprint(base) if base is not None else None
        if base is not None:  # its shapes, checked against what the adapter's tensors need (hub.methods.fit)
            check_fit(adapter, base, cache_dir=self.settings.cache_dir)
        base_name = _base_name(base, base_name)
        digest = adapter_digest(adapter)
        registry = self.registry  # opened before anything is stored: a database that cannot be opened stores nothing

        # Checked before anything is stored: a refused registration writes nothing, not even an empty folder.
        entry = registry.check_registration(NewVersion(
            name, digest=digest, spec=adapter.spec, config=adapter.config, size_bytes=adapter.size_bytes, base=base_fp,
            base_name=base_name or adapter.spec.base_model, metrics=tuple(_metrics(metrics)), tags=tuple(tags),
            lineage=tuple(lineage), description=description, number=number,
            recipe=dict(recipe) if recipe is not None else None))
        _warn_if_not_pushable(name)

        def register() -> Registered:
            return registry.register_many([entry])[0]

        # Stored and registered under the digest's lock: no clean-up or collection can remove the artifact until
        # the version is committed, and a failure removes an artifact this call added once nothing refers to it.
        return store_and_register(self.store, registry, digest, lambda: self.store.put(adapter, digest=digest),
                                  register, members=member_digests(adapter.spec.method, adapter.config))

    def register_many(
        self,
        sources: Sequence[str | os.PathLike[str] | Adapter],
        *,
        base: BaseLike | None,
        name: str | None = None,
        base_name: str | None = None,
        metrics: Mapping[str, float] | Iterable[Metric] = (),
        tags: Iterable[str] = (),
        description: str | None = None,
        batch_size: int = BATCH_SIZE,
        workers: int | None = None,
    ) -> list[Registered]:
        """Register many adapters at once: each as ``register`` would, with the same guarantees, in a few
        transactions (one per ``batch_size`` versions) instead of one per version.

        ``name``: one adapter name for all of them (versions in the order given); by default each folder's own name
        (an in-memory Adapter then needs ``name``). ``base``, ``metrics``, ``tags`` and ``description`` apply to
        every version. Folders are read and hashed by ``workers`` threads (default: one per CPU, at most 8).
        A batch is stored and recorded whole or not at all: on an error its new artifacts are removed again and
        the batches before it stay registered. Raises what ``register`` raises, QueryError for a missing name.
        """
        check_int(batch_size, "batch size", minimum=1)
        names = [name or _source_name(source) for source in sources]
        base_fp = self.fingerprint(base) if base is not None else None
        base_name = _base_name(base, base_name)
        metric_list, tag_list = _metrics(metrics), tuple(tags)
        results: list[Registered] = []
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(names), batch_size):
                # Reading and hashing (file I/O, sha256: both release the GIL) is what takes time: in parallel.
                adapters = list(pool.map(_read_and_digest, sources[start:start + batch_size]))
                entries = [NewVersion(batch_name, digest=digest, spec=adapter.spec, config=adapter.config,
                                      size_bytes=adapter.size_bytes, base=base_fp,
                                      base_name=base_name or adapter.spec.base_model, metrics=tuple(metric_list),
                                      tags=tag_list, description=description)
                           for batch_name, (adapter, digest) in zip(names[start:start + batch_size], adapters,
                                                                    strict=True)]
                results += self._store_and_register_batch(pool, adapters, entries)
        return results

    def _store_and_register_batch(self, pool: ThreadPoolExecutor, adapters: list[tuple[Adapter, str]],
                                  entries: list[NewVersion]) -> list[Registered]:
        """``store_and_register`` for a batch: every digest's lock (and its composition members') held shared
        from before its artifact is stored until the one registry transaction commits; on failure the artifacts
        this batch added are removed again once nothing refers to them (hub.lifecycle explains the rules)."""
        registry = self.registry  # opened, and every entry checked, before anything is stored
        entries = [registry.check_registration(entry) for entry in entries]
        digests = [digest for _, digest in adapters]
        members = [m for adapter, _ in adapters for m in member_digests(adapter.spec.method, adapter.config)]
        added: set[str] = set()
        try:
            with self.store.reserve(*digests, *members):
                added = {digest for digest in digests if digest not in self.store}
                list(pool.map(lambda item: self.store.put(item[0], digest=item[1]), adapters))
                return registry.register_many(entries)
        except BaseException:
            # After the locks are released: a removal takes a digest's lock exclusively, and gives up when another
            # writer holds it.
            for digest in added:
                with contextlib.suppress(Exception):  # the registration's own error is the one to report
                    self.store.remove(digest, referenced=registry.is_referenced)
            raise

    def get(self, ref: str) -> VersionInfo:
        """One version: ``name`` (= ``name@latest``), ``name@3`` or ``name@ALIAS``. Raises NotFound, QueryError."""
        return self.registry.get(ref)

    def load(self, ref: str | VersionInfo) -> Adapter:
        """The adapter behind a registry reference (``name``, ``name@3``, ``name@prod``), read from the store and
        verified against its digest; fetched from the version's recorded remote when this machine lacks it."""
        version = ref if isinstance(ref, VersionInfo) else self.registry.get(ref)
        return self.artifact(version.digest)

    def artifact(self, digest: str) -> Adapter:
        """The stored artifact ``digest``, verified. Raises NotFound when neither the store nor a recorded remote
        of a version with this digest has it, IntegrityError when the stored copy is damaged."""
        if digest not in self.store:
            self._fetch(digest)
        return self.store.get(digest, verify=True)

    def _fetch(self, digest: str) -> None:
        """Fill the store from the first recorded remote that holds ``digest`` (machines sharing one registry
        database share its adapters this way). A remote that fails is reported and the next one tried."""
        from hub.remote import Remote

        places = [(version, remote) for version in self.registry.find_digest(digest)
                  for remote in self.registry.remotes(version.ref)]
        if not places:
            raise NotFound(f"artifact {digest[:12]} is not in the store at {self.store.root} and no remote of it "
                           f"is recorded")
        failures = []
        for version, remote in places:
            try:
                Remote(self).fetch(remote.repo_id, remote.commit, digest=digest)
            except HubError as exc:
                failures.append(str(exc))
                continue
            log.info("fetched %s (%s) from %s@%s", version.ref, digest[:12], remote.repo_id, remote.tag)
            return
        raise NotFound(f"artifact {digest[:12]} is not in the store and no recorded remote gave it: "
                       f"{'; '.join(failures)}")

    def export(self, ref: str, directory: str | os.PathLike[str], *, for_vllm: bool = False,
               base_model: str | None = None) -> Path:
        """Write a version as a PEFT folder that ``PeftModel.from_pretrained`` loads unchanged; ``for_vllm``: as
        the plain LoRA vLLM serves (see ``export_for_vllm``), ``base_model`` naming the model vLLM serves."""
        if for_vllm:
            return self.export_for_vllm(ref, directory, base_model=base_model).path
        version = self.registry.get(ref)
        adapter = self.artifact(version.digest)
        from hub.remote.paths import is_hub_model_id

        # A Hub id tells a PEFT user which base to load; a local path of the machine it was registered on would not.
        config = {key: value for key, value in adapter.config.items() if key != "base_model_name_or_path"}
        if is_hub_model_id(version.base_name):
            config["base_model_name_or_path"] = version.base_name
        return export_adapter(Adapter(config=config, tensors=adapter.tensors), directory)

    def export_for_vllm(self, ref: str, directory: str | os.PathLike[str], *,
                        base_model: str | None = None) -> VllmExport:
        """Write a LoRA-family version, weighted sum or stack as one plain LoRA vLLM accepts: scaling folded into
        B, ``lora_alpha`` = r, the rank padded to one of vLLM's ranks (reduced by SVD above 512, the error
        reported), ``base_model_name_or_path`` = ``base_model`` (default: the version's base Hub id). Raises
        Incompatible, with the reason, for DoRA, mixtures and other methods."""
        from hub.export_vllm import export_for_vllm

        return export_for_vllm(self, ref, directory, base_model=base_model)

    def serve(self, base: str, **options: Any) -> None:
        """Serve ``base`` and every adapter registered on it through an OpenAI-compatible API until stopped
        (``hub serve``); ``options`` are the fields of ``hub.server.ServerConfig`` (quantize, device, host, port,
        api_key, max_loaded, max_batch, max_queue, ...)."""
        from hub.server import ServerConfig, serve

        serve(self, ServerConfig(base=base, **options))

    def list(self, query: Query | None = None) -> Page[VersionInfo]:
        """Versions matching every filter of ``query`` (all versions not yanked when None); a list whose
        ``next_after`` is the cursor of the next page when ``query.limit`` cut it short."""
        query = query or Query()
        return self.registry.list(weights_hash=query.weights_hash, **query.filters())

    def search(self, text: str, query: Query | None = None) -> Page[SearchHit]:
        """Versions whose name, description, tags, metric names or card text hold every word of ``text`` (the
        last one as a prefix): the adapter named ``text`` first, then names holding the words, then the rest,
        newest first within each (``hub.registry.search``). ``query`` filters and pages as in ``list``; it cannot
        name an adapter or sort. Raises QueryError."""
        from hub.registry.search import search

        query = query or Query()
        if query.name is not None or query.sort is not None:
            raise QueryError("a search orders its own results and spans every adapter: no name or sort")
        return search(self.registry, text, method=query.method, min_rank=query.min_rank, max_rank=query.max_rank,
                      where=query.where, tags=query.tags, weights_hash=query.weights_hash,
                      include_yanked=query.include_yanked, limit=query.limit, after=query.after)

    def diff(self, a: str, b: str) -> Diff:
        """Compare two versions (``hub diff A B``): fields, config, recipe, metric deltas (b − a), tags, and their
        weight updates per module without forming ΔW (``hub.diff``). Weights of methods with no additive update
        are not compared; ``Diff.weights_refused`` says why. Raises NotFound, QueryError."""
        from hub.diff import compare, delta_refusal

        first, second = self.get(a), self.get(b)
        if delta_refusal(first) or delta_refusal(second):
            return compare(first, second)
        return compare(first, second, adapters=(self.artifact(first.digest), self.artifact(second.digest)))

    def web_app(self, *, api_key: str | None = None) -> Any:
        """The registry's web pages as a FastAPI app (``hub ui``; ``hub.web``): read-only, unless ``api_key`` is
        given, which then allows alias moves and yanks from the pages to whoever sends it."""
        from hub.web import create_app

        return create_app(self, api_key=api_key)

    def compatible(self, base: BaseLike, query: Query | None = None) -> Page[Match]:
        """Registered versions that fit ``base``: exact (same weights) first, then structural (same shapes);
        paged as ``list`` is."""
        page = self.registry.compatible(self.fingerprint(base), **(query or Query()).filters())
        # Listed only when the adapter's tensors fit the base's shapes (a version registered with a bare
        # fingerprint was never checked).
        fits = stored_fit(base, self.store.path, cache_dir=self.settings.cache_dir)
        return Page([match for match in page if fits(match.version.digest)], page.next_after)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def alias(self, ref: str, alias: str) -> VersionInfo:
        """Point ``name@alias`` at the version ``ref`` (moving it if it pointed elsewhere)."""
        return self.registry.set_alias(ref, alias)

    def unalias(self, name: str, alias: str) -> None:
        """Remove ``name@alias``. Raises NotFound when there is no such alias."""
        self.registry.remove_alias(name, alias)

    def yank(self, ref: str) -> VersionInfo:
        """Hide a version from lists and ``@latest``; it stays reachable by number and alias."""
        return self.registry.yank(ref)

    def unyank(self, ref: str) -> VersionInfo:
        """Show a yanked version again (a no-op for one that is not yanked)."""
        return self.registry.unyank(ref)

    def delete(self, ref: str, *, force: bool = False) -> DeleteReport:
        """Delete the version ``ref`` (``name@N`` or ``name@alias``, never a bare name) with its metrics, aliases,
        tags and remote records, then its artifact when nothing else needs it. Its number is never reused.
        Raises Conflict while another version's lineage names it, unless ``force``."""
        from hub.lifecycle import delete_version

        return delete_version(self.store, self.registry, ref, force=force)

    def gc(self, *, dry_run: bool = True) -> GcReport:
        """What nothing needs: store artifacts no version refers to, abandoned staging folders, stale files of the
        hub's download caches (partial downloads of killed pulls included) and temporary folders left by killed
        pushes and base conversions; listed (``dry_run``) or removed. Safe beside concurrent registrations."""
        from hub.lifecycle import collect_garbage

        cache = self.settings.cache_dir
        # The hub's other temporary folders: a push's staging copy, a SmolLM2 conversion, a LoftQ-derived base.
        temporaries = [cache / "tmp" / "push-*", cache / "bases" / ".tmp-*",
                       self.settings.home / "bases" / ".loftq-*"]
        return collect_garbage(self.store, self.registry, download_cache=cache / "hf",
                               remote_downloads=cache / "remote", temporaries=temporaries, dry_run=dry_run)

    def lineage(self, ref: str) -> list[LineageEdge]:
        """Every ancestor edge of ``ref``, nearest first."""
        return self.registry.lineage(ref)

    def remotes(self, ref: str) -> list[RemoteRecord]:
        """The Hub repositories, tags and commits a version was pushed to or pulled from."""
        return self.registry.remotes(ref)

    def bases(self) -> list[BaseInfo]:
        return self.registry.bases()

    def add_metrics(self, ref: str, metrics: Mapping[str, float] | Iterable[Metric]) -> VersionInfo:
        """Record (or overwrite, per key/dataset/split) metrics of an existing version."""
        return self.registry.add_metrics(ref, _metrics(metrics))

    # -- remotes -----------------------------------------------------------------------------------------------
    def remote(self, *, endpoint: str | None = None, token: str | None = None) -> RemoteClient:
        """A client for one Hub endpoint (default HF_ENDPOINT) and token (default HF_TOKEN or the stored login)."""
        from hub.remote import Remote

        return Remote(self, endpoint=endpoint, token=token)

    def push(self, ref: str, repo_id: str | None = None, **options: Any) -> PushResult:
        """Push a version as a commit tagged ``v<N>`` with a model card; see ``hub.remote.Remote.push``."""
        return self.remote().push(ref, repo_id, **options)

    def pull(self, repo_id: str, revision: str | None = None, **options: Any) -> PullResult:
        """Download, verify and register a version; see ``hub.remote.Remote.pull``."""
        return self.remote().pull(repo_id, revision, **options)

    def pull_versions(self, repo_id: str, **options: Any) -> list[PullResult]:
        """Pull every version tag of a repo not already here; see ``hub.remote.Remote.pull_versions``."""
        return self.remote().pull_versions(repo_id, **options)

    # -- models ------------------------------------------------------------------------------------------------
    def compose(self, inputs: Sequence[Any], weights: Sequence[float] | str | None = None, **options: Any) -> Any:
        """A weighted sum, stack or gated mixture of registry references; see ``hub.composition.compose``.
        ``router`` may be a RouterConfig or its fields; ``search`` (for ``weights="auto"``) a SearchConfig, its
        method or its fields."""
        from hub.composition import RouterConfig, compose

        if isinstance(options.get("router"), Mapping):
            options["router"] = RouterConfig(**options["router"])
        return compose(inputs, weights, hub=self, **options)

    def activate(self, model: Any, source: Any, *, name: str | None = None, allow_structural: bool = False) -> Any:
        """Put a registered version or a composition onto ``model``; ``detach()`` on the result takes it off."""
        from hub.composition import activate

        return activate(model, source, hub=self, name=name, allow_structural=allow_structural)

    def rank(self, examples: Sequence[Example] = (), *, base: str | os.PathLike[str] | Any,
             data: str | os.PathLike[str] | None = None, candidates: Sequence[str] | None = None,
             query: Query | None = None, quantize: str | None = "nf4", device: str | None = None,
             generate: bool = True, allow_structural: bool = False) -> list[Ranked]:
        """Score ``candidates`` (default: every version ``compatible`` lists for ``base``, filtered by ``query``)
        on ``examples`` plus a JSONL file ``data``, on ``base`` loaded once (a folder, a Hub id or a loaded
        ``hub.runtime.Base``), best first; see ``hub.rank``. Unknown refs and refs for another base fail before the
        model loads. Raises NotFound, Incompatible, InvalidArtifact (no examples, a malformed file)."""
        from hub.rank import find_candidates, rank
        from hub.runtime import Base, load_tokenizer

        loaded = base if isinstance(base, Base) else None
        path = loaded.path if loaded is not None else resolve_base(base)
        tokenizer = loaded.tokenizer if loaded is not None else load_tokenizer(path)
        if tokenizer is None:
            raise NotFound(f"the base at {path} has no tokenizer")
        examples = [*examples, *(self.examples(data=data, tokenizer=tokenizer) if data is not None else ())]
        if not examples:
            raise InvalidArtifact("no examples to rank the adapters on: give examples or a data file")
        fingerprint = loaded.fingerprint if loaded is not None else self.fingerprint(path)
        chosen = find_candidates(self, fingerprint, candidates, query or Query())
        loaded = loaded or self.load_base(path, quantize=quantize, device=device)
        return rank(loaded.model, loaded.tokenizer, examples, chosen, hub=self, generate=generate,
                    allow_structural=allow_structural)

    def fit(self, mixture: Any, *, examples: Sequence[Example] = (), tasks: Iterable[str] = (),
            data: str | os.PathLike[str] | None = None, per_task: int = 300, base: str | None = None,
            quantize: str | None = "nf4", device: str | None = None, allow_structural: bool = False,
            steps: int = 40, lr: float = 1e-2, seed: int = 0, progress: bool = True) -> Any:
        """Train a mixture's gate on its experts' base (or ``base``), loaded once, on ``examples`` plus
        ``per_task`` distinct training examples of each built-in task in ``tasks`` plus a JSONL file ``data``.
        Raises HubError when no base is known or no examples are given."""
        from hub.data import read_jsonl
        from hub.tasks import examples as task_examples

        base = base or next((m.base_name for m in mixture.experts if m.base_name), None)
        if base is None:
            raise HubError("the experts' registry entries name no base model to fit the gate on: pass a base")
        loaded = self.load_base(base, quantize=quantize, device=device)
        fit_set = [*examples, *(ex for task in tasks for ex in task_examples(task, "train", per_task))]
        if data is not None:
            fit_set += read_jsonl(data, tokenizer=loaded.tokenizer)
        if not fit_set:
            raise HubError("no examples to fit the gate on: give tasks, a data file or examples")
        return mixture.fit(loaded.model, loaded.tokenizer, fit_set, steps=steps, lr=lr, seed=seed,
                           allow_structural=allow_structural, progress=progress)

    def load_base(self, base: str | os.PathLike[str], *, quantize: str | None = "nf4",
                  device: str | None = None) -> Any:
        """Load a base model (``smollm2``, a folder or a Hub id) with its tokenizer: ``hub.runtime.Base``.
        Raises NotFound when it has no tokenizer."""
        from hub.runtime import load_base

        loaded = load_base(resolve_base(base), quantize=quantize, device=device)
        if loaded.tokenizer is None:
            raise NotFound(f"the base at {loaded.path} has no tokenizer")
        return loaded

    def examples(self, *, task: str | None = None, data: str | os.PathLike[str] | None = None, split: str = "test",
                 count: int = 50, tokenizer: Any = None) -> list[Example]:
        """Examples from exactly one of a built-in ``task`` (its ``split``) or a JSONL file ``data`` (chats are
        rendered with ``tokenizer``'s template). Raises QueryError when both or neither are given."""
        from hub.data import read_jsonl
        from hub.tasks import examples

        if (data is None) == (task is None):
            raise QueryError("give exactly one of a task and a data file")
        return read_jsonl(data, tokenizer=tokenizer) if data is not None else examples(str(task), split, count)

    def train(self, name: str, *, recipe: Recipe | Mapping[str, Any] | None = None, task: str | None = None,
              data: str | None = None,
              count: int = 1000, base: str = SMOLLM2, quantize: str | None = "nf4", device: str | None = None,
              eval_task: str | None = None, eval_data: str | None = None, eval_count: int = 50,
              tags: Iterable[str] = (), description: str | None = None, progress: bool = True) -> Trained:
        """Train a new version of ``name`` (``recipe``: a hub.train.Recipe or its fields) on ``task`` or ``data``,
        evaluate it when an eval set is given, and register it with its recipe and metrics.

        Everything checkable (recipe, data) is checked before the model loads. Raises InvalidArtifact when the
        loss becomes NaN (nothing is registered)."""
        from hub.evaluate import evaluate
        from hub.methods.loftq import derived_base
        from hub.runtime import attach, load_tokenizer
        from hub.train import Recipe
        from hub.train import train as run_training

        check_name(name)  # before minutes of training: none of that work is lost to a typo in the name
        if description is not None:
            check_description(description)
        recipe = Recipe.from_dict(dict(recipe)) if isinstance(recipe, Mapping) else recipe or Recipe()
        path = resolve_base(base)
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise NotFound(f"the base at {path} has no tokenizer to train with")
        train_set = self.examples(task=task, data=data, split="train", count=count, tokenizer=tokenizer)
        test_set = None
        if eval_task is not None or eval_data is not None:
            test_set = self.examples(task=eval_task, data=eval_data, split="test", count=eval_count,
                                     tokenizer=tokenizer)
        loaded = self.load_base(path, quantize=quantize, device=device)
        result = run_training(loaded.model, tokenizer, train_set, recipe, progress=progress, device=device)
        if any(math.isnan(loss) for loss in result.losses):
            raise InvalidArtifact("training diverged (the loss became NaN); try a lower learning rate")
        metrics: list[Metric] = []
        if test_set is not None:
            handle = attach(loaded.model, result.adapter, name=f"eval-{name}")
            try:
                scores = evaluate(loaded.model, tokenizer, test_set, progress=progress)
            finally:
                handle.detach()
            dataset = eval_task or Path(eval_data or "").name
            metrics = [Metric(key=k, value=v, dataset=dataset, split="test") for k, v in scores.as_metrics().items()]
        # LoftQ trains on a base it derived from this one (hub.methods.loftq): the version belongs to that base.
        trained_on = derived_base(loaded.model) or path
        registered = self.register(result.adapter, name=name, base=os.fspath(trained_on), metrics=metrics,
                                   tags=tags, description=description, recipe=result.recipe.to_dict())
        return Trained(registered=registered, losses=result.losses, seconds=result.seconds, metrics=metrics)

    def evaluate(self, refs: Sequence[str], *, task: str | None = None, data: str | None = None, count: int = 50,
                 base: str = SMOLLM2, quantize: str | None = "nf4", device: str | None = None,
                 allow_structural: bool = False, with_base: bool = False, record: bool = True,
                 progress: bool = True) -> list[Evaluation]:
        """Score each of ``refs`` (any registered kind) on the same base and examples; ``with_base`` scores the
        bare base first (never recorded). Metrics are recorded per dataset with split ``test`` unless
        ``record=False``. Unknown refs fail before the model loads."""
        from hub.composition import activate
        from hub.evaluate import evaluate

        versions = [self.get(ref) for ref in refs]
        loaded = self.load_base(base, quantize=quantize, device=device)
        test_set = self.examples(task=task, data=data, split="test", count=count, tokenizer=loaded.tokenizer)
        dataset = task or Path(data or "").name
        results = []
        if with_base:
            scores = evaluate(loaded.model, loaded.tokenizer, test_set, progress=progress).as_metrics()
            results.append(Evaluation(ref="(base)", dataset=dataset, split="test", count=len(test_set),
                                      metrics=scores))
        for version in versions:
            handle = activate(loaded.model, version.ref, hub=self, allow_structural=allow_structural)
            check = getattr(handle, "base_check", None)
            try:
                scores = evaluate(loaded.model, loaded.tokenizer, test_set, progress=progress).as_metrics()
            finally:
                handle.detach()
            results.append(Evaluation(ref=version.ref, dataset=dataset, split="test", count=len(test_set),
                                      metrics=scores, base_check=str(check) if check is not None else None))
            if record:
                self.add_metrics(version.ref, [Metric(key=k, value=v, dataset=dataset, split="test")
                                               for k, v in scores.items()])
        return results

    def upgrade_database(self) -> str:
        """Bring the registry database to the current schema (alembic); returns the revision it is at."""
        from hub.registry import upgrade

        return upgrade(self.settings.database_url)

    def database_status(self) -> SchemaStatus:
        """The registry database's schema revision against this release's, read without changing anything."""
        from hub.registry import schema_status

        return schema_status(self.settings.database_url)

    def fingerprint(self, base: BaseLike) -> Fingerprint:
        if isinstance(base, Fingerprint):
            return base
        return fingerprint(base, cache_dir=self.settings.cache_dir)


def _warn_if_not_pushable(name: str) -> None:
    """A registry name the Hugging Face Hub would refuse as a repository name is fine here; say so before a push
    fails on it."""
    from hub.remote.paths import hub_repo_name_problem

    problem = hub_repo_name_problem(name) if isinstance(name, str) else None
    if problem:
        log.warning("the name %r %s, so it cannot be a Hub repository name: push it with --repo ORG/OTHER-NAME",
                    name, problem)


def _base_name(base: BaseLike | None, base_name: str | None) -> str | None:
    """The name a version records for its base: ``base_name``, else the base as given. A folder on this machine is
    recorded by its absolute path: a relative one (``models/tiny``) reads as a Hub model id from any other folder or
    machine, and would reach a pushed card as ``base_model``."""
    if base_name is None and base is not None and not isinstance(base, Fingerprint):
        base_name = str(base) if isinstance(base, (str, os.PathLike)) else getattr(base, "name_or_path", None)
    if isinstance(base_name, str) and base_name and os.path.exists(os.path.expanduser(base_name)):
        return os.path.abspath(os.path.expanduser(base_name))
    return base_name


def _read_and_digest(source: str | os.PathLike[str] | Adapter) -> tuple[Adapter, str]:
    adapter = source if isinstance(source, Adapter) else read_adapter(source)
    return adapter, adapter_digest(adapter)


def _source_name(source: str | os.PathLike[str] | Adapter) -> str:
    """The adapter name a folder registers under by default: its own name. Raises QueryError for an Adapter."""
    if isinstance(source, Adapter):
        raise QueryError("an in-memory adapter has no folder name to register under: pass name=")
    return Path(source).resolve().name


def _metrics(metrics: Mapping[str, float] | Iterable[Metric]) -> list[Metric]:
    if isinstance(metrics, Mapping):
        # Values are checked (and converted) by the registry: a bad one is a QueryError, not a ValueError.
        return [Metric(key=key, value=value) for key, value in metrics.items()]
    return list(metrics)
