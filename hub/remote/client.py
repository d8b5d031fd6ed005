"""``Remote``: push and pull adapter versions to and from a Hugging Face Hub (or any server speaking its API).

One Hub repository per adapter name. Each version is a commit holding the PEFT files and a model card, tagged
``v<N>``; version tags never move. Aliases become tags too and may move, unless they would move a version tag or
shadow a branch. A pull reads any revision (and any folder of a repo holding several adapters), verifies the
digest the card promises, and registers the version under its name, number, metrics and lineage.

The server is not trusted: what it sends never names a local path (files land in the hub's own download folders,
see ``paths.Downloads``), the card is parsed under limits and validated (``cards``), every error becomes one
scrubbed line (``errors``). docs/remote-security.md says what is guarded and why.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import httpx2
from huggingface_hub import HfApi, RepoFile
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from hub.errors import Conflict, HubError, IntegrityError, InvalidArtifact, NotFound, QueryError, RemoteError
from hub.fingerprint import Fingerprint
from hub.formats import CONFIG_NAME, WEIGHTS_NAME, Adapter, adapter_digest, read_adapter, write_adapter
from hub.registry import Parent, VersionInfo
from hub.registry.refs import check_name
from hub.remote.cards import CARD_NAME, MAX_CARD_BYTES, RemoteCard, model_card, read_card
from hub.remote.errors import remote_errors, translate
from hub.remote.paths import (
    COMMIT,
    VERSION_TAG,
    Downloads,
    check_repo_id,
    check_revision,
    check_subfolder,
    hub_repo_name_problem,
    is_hub_model_id,
    remote_location,
)
from hub.secrets import remember, scrub, scrub_logs

if TYPE_CHECKING:
    from hub.client import Hub

log = logging.getLogger("hub.remote")

ARTIFACT_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
MAX_CONFIG_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER_BYTES = 32 << 20
MAX_REPO_FILES = 10_000
_SIZE_LIMITS = {CARD_NAME: (MAX_CARD_BYTES, "model cards"), CONFIG_NAME: (MAX_CONFIG_BYTES, "adapter configs")}

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    """``alias_tags``: aliases of the version now tagged on the repo; ``skipped_aliases``: those not pushed because
    the tag would move a version tag or shadow a branch or git ref (a warning says which)."""

    ref: str
    repo_id: str
    tag: str
    commit: str
    uploaded: bool
    alias_tags: tuple[str, ...] = ()
    skipped_aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class PullResult:
    """``verified``: the downloaded files have the digest a hub card promised. False for a plain PEFT repo: then
    the version's digest is that of what was downloaded, and nothing vouched for it."""

    version: VersionInfo
    repo_id: str
    revision: str
    commit: str
    created: bool
    subfolder: str | None = None
    verified: bool = False


@dataclass(frozen=True)
class RemoteVersion:
    """A version as a remote repo's card describes it (read without downloading weights). ``problem``: why the
    tag's card could not be read (then the other card fields are None)."""

    repo_id: str
    tag: str
    name: str | None
    number: int | None
    digest: str | None
    method: str | None
    rank: int | None
    base: Fingerprint | None
    base_model: str | None
    match: str | None = None  # "exact", "structural", "no" or None when no local base was given
    problem: str | None = None


def _scrubbed(method: Callable[P, T]) -> Callable[P, T]:
    """Whatever HubError leaves a public method, its message is scrubbed: a server may put the token anywhere."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except HubError as exc:
            exc.args = (scrub(str(exc)),)
            raise

    return wrapper


class Remote:
    """A Hub endpoint plus credentials.

    ``endpoint`` defaults to ``HF_ENDPOINT`` as set now (not when huggingface_hub was imported), else the public
    Hub; ``token`` to what huggingface_hub finds (``HF_TOKEN``, the stored login). Downloads go under
    ``<HUB_HOME>/cache/remote``; huggingface_hub's shared cache is never read or written.
    """

    def __init__(self, hub: Hub, *, endpoint: str | None = None, token: str | None = None) -> None:
        self.hub = hub
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=token)
        remember(token)
        # Telemetry's agent detection writes a file under HF_HOME and asks the endpoint fixed at import time
        # (huggingface.co unless HF_ENDPOINT was set then): the hub writes nothing outside HUB_HOME.
        hf_constants.HF_HUB_DISABLE_TELEMETRY = True
        scrub_logs("httpx2", "httpcore2", "huggingface_hub")

    # -- push ----------------------------------------------------------------------------------------------
    @_scrubbed
    def push(self, ref: str, repo_id: str | None = None, *, private: bool = False,
             base_model: str | None = None) -> PushResult:
        """Push version ``ref`` as a commit tagged ``v<N>`` in ``repo_id`` (default ``<namespace>/<name>``, the
        namespace from ``HUB_REMOTE_NAMESPACE`` or the logged-in user), and its aliases as tags.

        ``base_model``: the base's Hub model id for the card; default the version's base name when that is a Hub
        id and not a folder here. An existing ``v<N>`` with the same digest uploads nothing.
        Raises QueryError (repo id, name or base model id not valid: checked before any network call), Conflict
        (``v<N>`` exists with other content), NotFound / RemoteError (server), HubError (local I/O).
        """
        version = self.hub.get(ref)
        if repo_id is not None:
            check_repo_id(repo_id)
        if base_model is not None and not is_hub_model_id(base_model):
            raise QueryError(f"base model {base_model!r} is not a Hub model id (ORG/NAME) or is a local folder")
        repo_id = repo_id or self._default_repo_id(version.name)
        tag = f"v{version.number}"
        with remote_errors(repo_id, self.endpoint):
            self._create_repo(repo_id, private)
            refs = self.api.list_repo_refs(repo_id)
        tags = {t.name: t.target_commit for t in refs.tags}
        branches = {b.name for b in refs.branches}
        existing = tags.get(tag)
        if existing is not None:
            card = self._card_at(repo_id, existing, f"{repo_id}@{tag}")
            theirs = card.digest if card is not None and card.digest else None
            if theirs != version.digest:
                raise Conflict(f"{repo_id} already has {tag} with other content (digest "
                               f"{theirs[:12] if theirs else 'unknown'}, local {version.digest[:12]}); version "
                               "tags never move")
            commit, uploaded = existing, False
        else:
            commit = self._upload(version, repo_id, base_model)
            with remote_errors(f"{repo_id}@{tag}", self.endpoint):
                self.api.create_tag(repo_id, tag=tag, revision=commit)
            uploaded = True
        alias_tags, skipped = self._push_aliases(repo_id, version, commit, tags, branches)
        self.hub.registry.record_remote(version.ref, repo_id=repo_id, tag=tag, commit=commit)
        return PushResult(ref=version.ref, repo_id=repo_id, tag=tag, commit=commit, uploaded=uploaded,
                          alias_tags=alias_tags, skipped_aliases=skipped)

    def _create_repo(self, repo_id: str, private: bool) -> None:
        # exist_ok=True would read "url" from the 409 answer, and a server that leaves it out would raise KeyError.
        try:
            self.api.create_repo(repo_id, private=private, exist_ok=False)
        except hf_errors.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 409:
                return
            # No right to create in the namespace, or a token without that scope: the repo may exist all the same.
            if status in (401, 402, 403) and self._repo_exists(repo_id):
                return
            raise

    def _repo_exists(self, repo_id: str) -> bool:
        try:
            self.api.repo_info(repo_id)
        except hf_errors.HfHubHTTPError:
            return False
        return True

    def _upload(self, version: VersionInfo, repo_id: str, base_model: str | None) -> str:
        """Commit the version's PEFT files and card; returns the commit id."""
        base_model = base_model or (version.base_name if is_hub_model_id(version.base_name) else None)
        adapter = self.hub.load(version)
        config = dict(adapter.config)
        # PEFT saves the local path of the base here; only a Hub id means anything to whoever downloads it.
        if base_model:
            config["base_model_name_or_path"] = base_model
        else:
            config.pop("base_model_name_or_path", None)
        where = f"{repo_id}@v{version.number}"
        with remote_errors(where, self.endpoint):
            staging = self.hub.settings.cache_dir / "tmp"
            staging.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="push-", dir=staging) as tmp:
                folder = Path(tmp)
                write_adapter(Adapter(config=config, tensors=adapter.tensors), folder)
                (folder / CARD_NAME).write_text(model_card(version, repo_id=repo_id, base_model=base_model))
                info = self.api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=version.ref)
        if not isinstance(info.oid, str) or not COMMIT.fullmatch(info.oid):
            raise RemoteError(f"{where}: the server answered the upload with {str(info.oid)[:60]!r}, not a commit id")
        return info.oid

    def _push_aliases(self, repo_id: str, version: VersionInfo, commit: str, tags: dict[str, str],
                      branches: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        pushed, skipped = [], []
        for alias in version.aliases:
            problem = alias_tag_problem(alias, branches)
            if problem:
                log.warning("%s", scrub(f"alias {alias} of {version.ref} is not pushed to {repo_id}: {problem}"))
                skipped.append(alias)
                continue
            if tags.get(alias) != commit:
                with remote_errors(f"{repo_id}@{alias}", self.endpoint):
                    if alias in tags:  # an alias moves: re-point its tag at this version's commit
                        self.api.delete_tag(repo_id, tag=alias)
                    self.api.create_tag(repo_id, tag=alias, revision=commit)
            pushed.append(alias)
        return tuple(pushed), tuple(skipped)

    def _default_repo_id(self, name: str) -> str:
        problem = hub_repo_name_problem(name)
        if problem:
            raise QueryError(f"adapter name {name!r} cannot name a Hub repository: it {problem}; choose the repo "
                             "with --repo ORG/NAME")
        namespace = os.environ.get("HUB_REMOTE_NAMESPACE")
        if not namespace:
            with remote_errors(name, self.endpoint):
                namespace = self.api.whoami()["name"]
        return check_repo_id(f"{namespace}/{name}")

    # -- pull ----------------------------------------------------------------------------------------------
    @_scrubbed
    def pull(self, repo_id: str, revision: str | None = None, *, name: str | None = None,
             subfolder: str | None = None) -> PullResult:
        """Download a revision (``main`` by default; the adapter in ``subfolder`` for repos holding several),
        verify it, store and register it (same name, number, metrics and lineage as the card says).

        ``name`` chooses the local line; without it the card's name (or the repo's) is used, and a line of that
        name that did not come from this repo is refused.
        Raises QueryError (ids not valid), NotFound / RemoteError (server), InvalidArtifact (files or card
        malformed, over a limit, or a hub card without a valid digest), IntegrityError (digest differs from the
        card's), Conflict (the local line came from elsewhere; or its version number holds other content).
        """
        check_repo_id(repo_id)
        subfolder = check_subfolder(subfolder)
        revision = check_revision(revision)
        if name is not None:
            check_name(name)
        location = remote_location(repo_id, subfolder)
        where = f"{location}@{revision}"
        downloads = Downloads(self.hub.settings.cache_dir / "remote", self.endpoint, repo_id)
        commit, sizes = self._resolve(downloads, repo_id, revision, where)
        adapter, card, verified = self._artifact(downloads, repo_id, commit, subfolder, sizes, where)
        hub_card = card if card is not None and card.hub_card else None
        line = name or (hub_card.name if hub_card and hub_card.name else None) or _name_from(repo_id, subfolder)
        if name is None:
            self._check_line(line, location)
        base_model = card.base_model if card is not None else None
        if is_hub_model_id(adapter.spec.base_model):
            base_model = base_model or adapter.spec.base_model
        elif adapter.spec.base_model is not None:
            # The publisher's local path to its base means nothing here (and the digest leaves this key out).
            config = {k: v for k, v in adapter.config.items() if k != "base_model_name_or_path"}
            adapter = Adapter(config=config, tensors=adapter.tensors)
        registered = self.hub.register(
            adapter, name=line, base=hub_card.base if hub_card else None, base_name=base_model,
            metrics=hub_card.metrics if hub_card else (),
            lineage=self._known_parents(hub_card.lineage) if hub_card else (),
            tags=hub_card.tags if hub_card else (), number=hub_card.number if hub_card else None,
            recipe=hub_card.recipe if hub_card else None,
        )
        tag = revision if revision != commit else f"v{registered.version.number}"
        self.hub.registry.record_remote(registered.version.ref, repo_id=location, tag=tag, commit=commit)
        return PullResult(version=registered.version, repo_id=repo_id, revision=revision, commit=commit,
                          created=registered.created, subfolder=subfolder, verified=verified)

    @_scrubbed
    def fetch(self, location: str, commit: str, *, digest: str) -> Adapter:
        """Download the artifact a registry's remote record names (``ORG/NAME[/FOLDER]`` at ``commit``), check it
        is ``digest`` and put it in the store: how a machine sharing a registry database gets the files.

        Raises QueryError (a malformed record), NotFound / RemoteError (server), InvalidArtifact (files
        malformed or over a limit), IntegrityError (the files are not ``digest``).
        """
        parts = location.split("/")
        repo_id = check_repo_id("/".join(parts[:2]))
        subfolder = check_subfolder("/".join(parts[2:]) or None)
        where = f"{location}@{commit[:12]}"
        downloads = Downloads(self.hub.settings.cache_dir / "remote", self.endpoint, repo_id)
        commit, sizes = self._resolve(downloads, repo_id, check_revision(commit), where)
        adapter, _, _ = self._artifact(downloads, repo_id, commit, subfolder, sizes, where)
        found = adapter_digest(adapter)
        if found != digest:
            downloads.evict(commit)
            raise IntegrityError(f"{where}: the files there have digest {found[:12]}, the registry records "
                                 f"{digest[:12]}")
        self.hub.store.put(adapter, digest=digest)
        return adapter

    def _artifact(self, downloads: Downloads, repo_id: str, commit: str, subfolder: str | None,
                  sizes: dict[str, int | None] | None, where: str) -> tuple[Adapter, RemoteCard | None, bool]:
        """The adapter at ``commit`` (in ``subfolder``), its card and whether the card vouched for its digest;
        a copy that fails any check is evicted, so the next try downloads afresh."""
        try:
            wanted = [f"{subfolder}/{file}" if subfolder else file for file in ARTIFACT_FILES]
            self._download(downloads, repo_id, commit, wanted, sizes, where)
            folder = downloads.commit_folder(commit).joinpath(*(subfolder or ".").split("/"))
            if not (folder / CONFIG_NAME).is_file():
                raise NotFound(f"{where}: no {CONFIG_NAME} there, so no adapter (`hub list --remote {repo_id} "
                               "--folders` lists the folders that hold one)")
            card = read_card(folder / CARD_NAME, where)
            _check_safetensors_header(folder / WEIGHTS_NAME, where)
            try:
                adapter = read_adapter(folder)
            except InvalidArtifact as exc:
                raise InvalidArtifact(f"{where}: {exc}") from None
            return adapter, card, _verify(card, adapter_digest(adapter), where)
        except HubError:
            downloads.evict(commit)
            raise

    @_scrubbed
    def pull_versions(self, repo_id: str, *, name: str | None = None) -> list[PullResult]:
        """Pull every ``v<N>`` tag of a repo, oldest first, from one listing of its refs; a tag whose commit this
        registry already holds from this repo is skipped without a request. Raises as ``pull`` does; the versions
        pulled before a failure stay registered."""
        check_repo_id(repo_id)
        with remote_errors(repo_id, self.endpoint):
            refs = self.api.list_repo_refs(repo_id)
        tags = sorted((t for t in refs.tags if isinstance(t.name, str) and VERSION_TAG.fullmatch(t.name)),
                      key=lambda t: int(t.name[1:]))
        known = self.hub.registry.commits_from(repo_id)
        pulled = []
        for tag in tags:
            if tag.target_commit in known:
                continue
            result = self.pull(repo_id, tag.name, name=name)
            name = name or result.version.name  # later tags join the line the first one made or found
            pulled.append(result)
        return pulled

    def _resolve(self, downloads: Downloads, repo_id: str, revision: str,
                 where: str) -> tuple[str, dict[str, int | None] | None]:
        """The commit ``revision`` points at and the repo's files with their sizes; when the server cannot be
        reached, the commit it pointed at last time (files then None: what was downloaded is used)."""
        try:
            info = self.api.model_info(repo_id, revision=revision, files_metadata=True)
        except (httpx2.ConnectError, httpx2.TimeoutException, hf_errors.OfflineModeIsEnabled) as exc:
            commit = downloads.recall_revision(revision)
            if commit is None or not downloads.commit_folder(commit).is_dir():
                raise translate(exc, where, self.endpoint) from None
            log.warning("%s", scrub(f"{where}: cannot reach {self.endpoint}; using the copy downloaded before "
                                    f"(commit {commit[:12]})"))
            return commit, None
        except Exception as exc:
            raise translate(exc, where, self.endpoint) from None
        if not isinstance(info.sha, str) or not COMMIT.fullmatch(info.sha):
            raise RemoteError(f"{where}: the server named {str(info.sha)[:60]!r} as the commit, not a commit id")
        siblings = info.siblings or []
        if len(siblings) > MAX_REPO_FILES:
            raise InvalidArtifact(f"{where}: the repository lists more than {MAX_REPO_FILES} files, the limit for "
                                  "a pull")
        with remote_errors(where, self.endpoint):
            downloads.remember_revision(revision, info.sha)
        return info.sha, {s.rfilename: s.size for s in siblings if isinstance(s.rfilename, str)}

    def _download(self, downloads: Downloads, repo_id: str, commit: str, paths: list[str],
                  sizes: dict[str, int | None] | None, where: str) -> dict[str, Path]:
        """Download those of ``paths`` the repo has at ``commit`` (``sizes``; None: use what is already here)
        into the commit's own folder, each checked against its size limit before and after."""
        folder = downloads.commit_folder(commit)
        found = {}
        for path in paths:
            expected = folder.joinpath(*path.split("/"))
            if sizes is None:
                if not expected.is_file():
                    continue
            elif path not in sizes:
                continue
            else:
                _check_size(path, sizes[path], where)
            with remote_errors(where, self.endpoint):
                try:
                    # local_dir mode names the file after ``path`` (which the hub chose), not after the server's
                    # ETag or commit header; cache_dir is the hub's own, empty one: no shared cache is consulted.
                    local = Path(self.api.hf_hub_download(repo_id, path, revision=commit, local_dir=folder,
                                                          cache_dir=downloads.hf_cache))
                except OSError as exc:
                    # The one server-chosen part of a local name is the ETag in the temporary file's name: one
                    # holding '/' or '..' names a folder that does not exist, and the download fails here.
                    if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.EINVAL) and _inside(exc.filename, folder):
                        raise RemoteError(f"{where}: the server's answer for {path} cannot be stored (an ETag that "
                                          "is not a plain id?); refused") from None
                    raise
            if local.is_symlink() or not local.is_file() or local.resolve() != expected.resolve():
                raise InvalidArtifact(f"{where}: {path} was not saved where the hub asked; refused")
            _check_size(path, local.stat().st_size, where)
            found[path] = local
        return found

    def _check_line(self, name: str, location: str) -> None:
        """Refuse to add a pulled version to a local line that did not come from ``location``."""
        versions = self.hub.registry.list(name=name, include_yanked=True)
        if not versions or any(r.repo_id == location for v in versions for r in self.hub.registry.remotes(v.ref)):
            return
        raise Conflict(f"{name} already exists here and did not come from {location}; pull it under another name "
                       "with --name NAME (or name this line explicitly to add to it)")

    def _known_parents(self, lineage: tuple[Parent, ...]) -> list[Parent]:
        """The card's lineage parents this registry holds; the others are reported, not invented."""
        known = []
        for parent in lineage:
            try:
                local = self.hub.registry.get(parent.ref)
            except NotFound:
                local = None
            if local is not None and parent.digest in (None, local.digest):
                known.append(parent)
            else:
                log.warning("%s", scrub(f"lineage parent {parent.ref} is not in this registry; pull it to record "
                                        "the link"))
        return known

    # -- browse --------------------------------------------------------------------------------------------
    @_scrubbed
    def versions(self, repo_id: str, *, base: Fingerprint | None = None) -> list[RemoteVersion]:
        """The ``v<N>`` tags of a repo, read from their cards only (no weights downloaded). A tag whose card cannot
        be read is listed with its ``problem``.

        Raises QueryError (repo id not valid), NotFound / RemoteError (server).
        """
        check_repo_id(repo_id)
        with remote_errors(repo_id, self.endpoint):
            refs = self.api.list_repo_refs(repo_id)
        found = []
        tags = sorted((t for t in refs.tags if isinstance(t.name, str) and VERSION_TAG.fullmatch(t.name)),
                      key=lambda t: int(t.name[1:]))
        for tag in tags:
            try:
                card = self._card_at(repo_id, tag.target_commit, f"{repo_id}@{tag.name}")
            except InvalidArtifact as exc:
                found.append(RemoteVersion(repo_id, tag.name, None, None, None, None, None, None, None,
                                           problem=scrub(str(exc))))
                continue
            fp = card.base if card else None
            match = None
            if base is not None:
                match = ("exact" if fp and fp.weights_hash and fp.weights_hash == base.weights_hash
                         else "structural" if fp and fp.shape_hash == base.shape_hash else "no")
            found.append(RemoteVersion(
                repo_id=repo_id, tag=tag.name, name=card.name if card else None,
                number=card.number if card else None, digest=card.digest if card else None,
                method=card.method if card else None, rank=card.rank if card else None, base=fp,
                base_model=card.base_model if card else None, match=match,
            ))
        return found

    @_scrubbed
    def adapters(self, repo_id: str, revision: str | None = None) -> list[str]:
        """The folders of a repo that hold an adapter (an adapter_config.json), sorted; ``""`` is the repo's root.
        Each can be pulled with ``pull(repo_id, revision, subfolder=...)``.

        Raises QueryError, NotFound / RemoteError, InvalidArtifact (more than ``MAX_REPO_FILES`` files).
        """
        check_repo_id(repo_id)
        revision = check_revision(revision)
        where = f"{repo_id}@{revision}"
        with remote_errors(where, self.endpoint):
            info = self.api.model_info(repo_id, revision=revision)
        siblings = info.siblings or []
        if len(siblings) > MAX_REPO_FILES:
            raise InvalidArtifact(f"{where}: the repository lists more than {MAX_REPO_FILES} files, the limit")
        folders = set()
        for sibling in siblings:
            path = PurePosixPath(sibling.rfilename if isinstance(sibling.rfilename, str) else "")
            if path.name != CONFIG_NAME:
                continue
            parent = "" if path.parent == PurePosixPath(".") else path.parent.as_posix()  # "": the repo's root
            try:
                folders.add(check_subfolder(parent) or "")
            except QueryError:
                log.warning("%s", scrub(f"{where}: skipping a folder whose name the hub does not accept: "
                                        f"{parent[:80]!r}"))
        return sorted(folders)

    def _card_at(self, repo_id: str, commit: str, where: str) -> RemoteCard | None:
        """The card of the commit a tag points at (None when it has none); InvalidArtifact when it is unreadable."""
        if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
            raise InvalidArtifact(f"{where}: the server gave {str(commit)[:60]!r} as the tag's commit")
        downloads = Downloads(self.hub.settings.cache_dir / "remote", self.endpoint, repo_id)
        with remote_errors(where, self.endpoint):
            infos = self.api.get_paths_info(repo_id, [CARD_NAME], revision=commit)
        sizes = {i.path: i.size for i in infos if isinstance(i, RepoFile)}
        files = self._download(downloads, repo_id, commit, [CARD_NAME], sizes, where)
        return read_card(files[CARD_NAME], where) if CARD_NAME in files else None


def alias_tag_problem(alias: str, branches: set[str]) -> str | None:
    """Why an alias cannot be a tag on the repo (it would move a version tag, shadow a branch or look like a git
    ref), or None."""
    if VERSION_TAG.fullmatch(alias):
        return "it looks like a version tag, and version tags never move"
    if alias in branches:
        return "the repository has a branch of that name"
    if alias == "HEAD" or alias.startswith("refs/") or COMMIT.fullmatch(alias):
        return "it looks like a git ref"
    if ".." in alias or alias.endswith((".", ".lock")):
        return "git does not accept it as a tag name"
    return None


def _verify(card: RemoteCard | None, digest: str, where: str) -> bool:
    """True when a hub card promised ``digest``; IntegrityError when it promised another; False (and a warning)
    when nothing vouched for the files."""
    if card is not None and card.hub_card:
        if card.digest != digest:
            raise IntegrityError(f"{where}: downloaded files have digest {digest[:12]}, the card promises "
                                 f"{str(card.digest)[:12]}")
        return True
    log.warning("%s", scrub(f"{where}: no hub card vouches for these files; registered unverified, with the digest "
                            f"of what was downloaded ({digest[:12]})"))
    return False


def _check_size(path: str, size: int | None, where: str) -> None:
    limit = _SIZE_LIMITS.get(PurePosixPath(path).name)
    if limit is not None and isinstance(size, int) and size > limit[0]:
        raise InvalidArtifact(f"{where}: {path} is {size} bytes, over the {limit[0] >> 20} MiB limit for {limit[1]}")


def _check_safetensors_header(path: Path, where: str) -> None:
    """Refuse a safetensors file whose declared header (the little-endian u64 length prefix) is over the limit or
    longer than the file, before anything reads the header."""
    if not path.is_file():
        return  # read_adapter says what is missing
    with path.open("rb") as handle:
        prefix = handle.read(8)
    if len(prefix) < 8:
        raise InvalidArtifact(f"{where}: {WEIGHTS_NAME} is too short to be a safetensors file")
    declared = int.from_bytes(prefix, "little")
    if declared > MAX_SAFETENSORS_HEADER_BYTES:
        raise InvalidArtifact(f"{where}: {WEIGHTS_NAME} declares a {declared}-byte header, over the "
                              f"{MAX_SAFETENSORS_HEADER_BYTES >> 20} MiB limit for safetensors headers")
    if declared > path.stat().st_size - 8:
        raise InvalidArtifact(f"{where}: {WEIGHTS_NAME} declares a header longer than the file")


def _inside(filename: object, folder: Path) -> bool:
    """Whether an error's file name starts inside ``folder`` (compared as text: the name may hold '..')."""
    return isinstance(filename, str) and filename.startswith(f"{folder.resolve()}{os.sep}")


def _name_from(repo_id: str, subfolder: str | None) -> str:
    """A local name for a repo (or a folder in it) whose card names none."""
    source = repo_id.split("/", 1)[1] + (f"-{subfolder}" if subfolder else "")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-.")
    return name[:200] or "adapter"

