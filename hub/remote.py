"""Push and pull adapter versions to and from a Hugging Face Hub (or any server speaking its API).

One Hub repository per adapter name. Each version is a commit holding the PEFT files and a model card, tagged
``v<N>``; aliases become tags too. The card's YAML follows Hub conventions (``base_model``,
``base_model_relation: adapter``, ``library_name: peft``) and carries the hub's metadata under ``adapter_hub`` so a
pull rebuilds the registry entry: digest, base fingerprint, method, rank, metrics, lineage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import httpx2
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub import errors as hf_errors

from hub.errors import Conflict, HubError, IntegrityError, InvalidArtifact, NotFound, RemoteError
from hub.fingerprint import Fingerprint
from hub.formats import CONFIG_NAME, WEIGHTS_NAME, Adapter, adapter_digest, read_adapter, write_adapter
from hub.registry import Metric, Parent, VersionInfo

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from hub.client import Hub

CARD_NAME = "README.md"
ARTIFACT_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class PushResult:
    ref: str
    repo_id: str
    tag: str
    commit: str
    uploaded: bool


@dataclass(frozen=True)
class PullResult:
    version: VersionInfo
    repo_id: str
    revision: str
    commit: str
    created: bool


@dataclass(frozen=True)
class RemoteVersion:
    """A version as a remote repo's card describes it (read without downloading weights)."""

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


class Remote:
    """A Hub endpoint plus credentials; ``endpoint`` and ``token`` default to HF_ENDPOINT / HF_TOKEN / token file."""

    def __init__(self, hub: Hub, *, endpoint: str | None = None, token: str | None = None) -> None:
        self.hub = hub
        # Read HF_ENDPOINT now, not when huggingface_hub was imported, so a changed environment is honoured.
        self.api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=token)
        self.endpoint = self.api.endpoint
        self._token = token

    # -- push ----------------------------------------------------------------------------------------------
    def push(self, ref: str, repo_id: str | None = None, *, private: bool = False) -> PushResult:
        version = self.hub.get(ref)
        repo_id = repo_id or self._default_repo_id(version.name)
        _check_repo_id(repo_id)
        tag = f"v{version.number}"
        with self._errors(repo_id):
            self.api.create_repo(repo_id, private=private, exist_ok=True)
            existing = self._tag_commit(repo_id, tag)
            if existing is not None:
                card = self._card_data(repo_id, existing)
                if card.get("digest") != version.digest:
                    raise Conflict(f"{repo_id} already has {tag} with different content (digest "
                                   f"{str(card.get('digest'))[:12]}, local {version.digest[:12]})")
                commit, uploaded = existing, False
            else:
                commit = self._upload(version, repo_id)
                self.api.create_tag(repo_id, tag=tag, revision=commit)
                uploaded = True
            for alias in version.aliases:
                # Aliases move: re-point the tag at this version's commit.
                with contextlib.suppress(hf_errors.HfHubHTTPError):
                    self.api.delete_tag(repo_id, tag=alias)
                self.api.create_tag(repo_id, tag=alias, revision=commit)
        self.hub.registry.record_remote(version.ref, repo_id=repo_id, tag=tag, commit=commit)
        return PushResult(ref=version.ref, repo_id=repo_id, tag=tag, commit=commit, uploaded=uploaded)

    def _upload(self, version: VersionInfo, repo_id: str) -> str:
        adapter = self.hub.store.get(version.digest, verify=True)
        with tempfile.TemporaryDirectory(prefix="hub-push-") as tmp:
            folder = Path(tmp)
            config = dict(adapter.config)
            if version.base_name:
                config["base_model_name_or_path"] = version.base_name
            write_adapter(Adapter(config=config, tensors=adapter.tensors), folder)
            (folder / CARD_NAME).write_text(model_card(version, repo_id=repo_id))
            info = self.api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"{version.ref}")
        return info.oid

    # -- pull ----------------------------------------------------------------------------------------------
    def pull(self, repo_id: str, revision: str | None = None, *, name: str | None = None) -> PullResult:
        """Download a revision, verify it, store and register it (same name, number, metrics and lineage)."""
        _check_repo_id(repo_id)
        revision = revision or "main"
        with self._errors(repo_id, revision):
            folder = Path(snapshot_download(
                repo_id, revision=revision, allow_patterns=ARTIFACT_FILES, endpoint=self.endpoint,
                token=self._token, cache_dir=self.hub.settings.cache_dir / "hf",
            ))
        commit = folder.name
        try:
            _check_local_names(folder)
            card = _read_card(folder)
            adapter = read_adapter(folder)
            digest = adapter_digest(adapter)
            if card.get("digest") and card["digest"] != digest:
                raise IntegrityError(f"{repo_id}@{revision}: downloaded files have digest {digest[:12]}, "
                                     f"the card promises {card['digest'][:12]}")
        except HubError:
            _evict_snapshot(folder)
            raise
        name = name or card.get("name") or _name_from_repo(repo_id)
        base = _fingerprint_from_card(card)
        registered = self.hub.register(
            adapter, name=name, base=base, base_name=card.get("base_model") or adapter.spec.base_model,
            metrics=[Metric(**m) for m in card.get("metrics", [])],
            lineage=self._known_parents(card.get("lineage", [])),
            tags=card.get("tags", []), number=card.get("number"), recipe=card.get("recipe"),
        )
        tag = revision if revision != commit else f"v{registered.version.number}"
        self.hub.registry.record_remote(registered.version.ref, repo_id=repo_id, tag=tag, commit=commit)
        return PullResult(version=registered.version, repo_id=repo_id, revision=revision, commit=commit,
                          created=registered.created)

    def _known_parents(self, lineage: list[dict[str, Any]]) -> list[Parent]:
        """The card's lineage parents this registry holds; the others are reported, not invented."""
        known = []
        for entry in lineage:
            parent = Parent(**entry)
            try:
                local = self.hub.registry.get(parent.ref)
            except NotFound:
                local = None
            if local is not None and parent.digest in (None, local.digest):
                known.append(parent)
            else:
                log.warning("lineage parent %s is not in this registry; pull it to record the link", parent.ref)
        return known

    # -- browse --------------------------------------------------------------------------------------------
    def versions(self, repo_id: str, *, base: Fingerprint | None = None) -> list[RemoteVersion]:
        """The tagged versions of a repo, read from their cards only (no weights downloaded)."""
        _check_repo_id(repo_id)
        with self._errors(repo_id):
            refs = self.api.list_repo_refs(repo_id)
            found = []
            for tag in sorted(refs.tags, key=lambda t: _version_key(t.name)):
                if not re.fullmatch(r"v\d+", tag.name):
                    continue
                card = self._card_data(repo_id, tag.target_commit)
                fp = _fingerprint_from_card(card)
                match = None
                if base is not None:
                    match = ("exact" if fp and fp.weights_hash == base.weights_hash
                             else "structural" if fp and fp.shape_hash == base.shape_hash else "no")
                found.append(RemoteVersion(
                    repo_id=repo_id, tag=tag.name, name=card.get("name"), number=card.get("number"),
                    digest=card.get("digest"), method=card.get("method"), rank=card.get("rank"), base=fp,
                    base_model=card.get("base_model"), match=match,
                ))
        return found

    def _card_data(self, repo_id: str, revision: str) -> dict[str, Any]:
        path = self.api.hf_hub_download(repo_id, CARD_NAME, revision=revision,
                                        cache_dir=self.hub.settings.cache_dir / "hf")
        return _read_card(Path(path).parent)

    def _tag_commit(self, repo_id: str, tag: str) -> str | None:
        refs = self.api.list_repo_refs(repo_id)
        return next((t.target_commit for t in refs.tags if t.name == tag), None)

    def _default_repo_id(self, name: str) -> str:
        namespace = os.environ.get("HUB_REMOTE_NAMESPACE")
        if not namespace:
            with self._errors(name):
                namespace = self.api.whoami()["name"]
        return f"{namespace}/{name}"

    @contextlib.contextmanager
    def _errors(self, repo_id: str, revision: str | None = None) -> Iterator[None]:
        """huggingface_hub and network failures become one-line hub errors, with any token scrubbed."""
        where = f"{repo_id}@{revision}" if revision else repo_id
        try:
            yield
        except HubError:
            raise
        except hf_errors.RevisionNotFoundError:
            raise NotFound(f"{where}: no such revision on {self.endpoint}") from None
        except hf_errors.RepositoryNotFoundError:
            raise NotFound(f"{repo_id}: no such repository on {self.endpoint} (or no access to it)") from None
        except hf_errors.EntryNotFoundError as exc:
            raise NotFound(f"{where}: {self._scrub(_first_line(exc))}") from None
        except hf_errors.LocalEntryNotFoundError:
            raise RemoteError(f"{where}: cannot reach {self.endpoint} and the revision is not in the local cache"
                              ) from None
        except hf_errors.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            reason = {401: "authentication failed (check HF_TOKEN)", 403: "access denied",
                      429: "rate limited by the server; retry later"}.get(status, _first_line(exc))
            raise RemoteError(f"{where}: {self._scrub(reason)}") from None
        except (httpx2.HTTPError, OSError) as exc:
            raise RemoteError(f"{where}: transfer failed ({self._scrub(_first_line(exc))})") from None

    def _scrub(self, text: str) -> str:
        token = self._token or self.api.token
        return text.replace(token, "***") if isinstance(token, str) and token else text


def model_card(version: VersionInfo, *, repo_id: str) -> str:
    """A Hub model card whose YAML carries everything a pull needs to rebuild the registry entry."""
    base_model = version.base_name if version.base_name and HUB_REPO_ID.match(version.base_name) else None
    tags = ["adapter-hub", version.method, *version.tags]
    if base_model:
        tags.append(f"base_model:adapter:{base_model}")
    metadata: dict[str, Any] = {
        "name": version.name, "number": version.number, "digest": version.digest, "method": version.method,
        "rank": version.rank, "alpha": version.alpha, "targets": list(version.targets),
        "metrics": [{"key": m.key, "value": m.value, "dataset": m.dataset, "split": m.split}
                    for m in version.metrics],
        "lineage": [{"name": p.name, "number": p.number, "digest": p.digest, "weight": p.weight,
                     "strategy": p.strategy, "params": p.params} for p in version.parents],
        "tags": list(version.tags),
    }
    if version.recipe is not None:
        metadata["recipe"] = version.recipe
    if version.base is not None:
        metadata["base"] = {"weights_hash": version.base.weights_hash, "shape_hash": version.base.shape_hash,
                            "architecture": version.base.architecture,
                            "num_parameters": version.base.num_parameters}
    if version.base_name and not base_model:
        metadata["base_name"] = version.base_name
    data = ModelCardData(base_model=base_model, library_name="peft", tags=tags, adapter_hub=metadata)
    if base_model:
        data.base_model_relation = "adapter"
    metric_lines = "\n".join(f"| {m.key} | {m.value:.4g} | {m.dataset or ''} | {m.split or ''} |"
                             for m in version.metrics) or "| (none) | | | |"
    body = (
        f"# {version.name} (version {version.number})\n\n"
        f"A {version.method} adapter (rank {version.rank}) on `{version.base_name or 'an unnamed base'}`, "
        f"published with adapter hub.\n\n"
        f"```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"{repo_id}\", "
        f"revision=\"v{version.number}\")\n```\n\n"
        f"| metric | value | dataset | split |\n| --- | --- | --- | --- |\n{metric_lines}\n\n"
        f"Artifact digest: `{version.digest}`\n"
    )
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _read_card(folder: Path) -> dict[str, Any]:
    """The card's ``adapter_hub`` section plus its Hub-level ``base_model``; {} for a plain PEFT repo."""
    path = folder / CARD_NAME
    if not path.exists():
        return {}
    data = ModelCard.load(path).data.to_dict()
    section = dict(data.get("adapter_hub") or {})
    base_model = data.get("base_model") or section.get("base_name")
    if isinstance(base_model, str):
        section["base_model"] = base_model
    return section


def _fingerprint_from_card(card: dict[str, Any]) -> Fingerprint | None:
    base = card.get("base")
    if not isinstance(base, dict) or not base.get("weights_hash"):
        return None
    return Fingerprint(weights_hash=base["weights_hash"], shape_hash=base["shape_hash"],
                       architecture=base.get("architecture"), num_parameters=base.get("num_parameters") or 0)


def _check_repo_id(repo_id: str) -> None:
    if not HUB_REPO_ID.match(repo_id) or ".." in repo_id:
        raise InvalidArtifact(f"{repo_id!r} is not a Hub repository id (ORG/NAME)")


def _check_local_names(folder: Path) -> None:
    """Refuse a snapshot whose files point outside it (absolute names, '..', symlinks leaving the cache)."""
    root = folder.resolve().parent.parent  # <repo cache>/snapshots/<sha> → the repo cache folder
    for path in folder.rglob("*"):
        relative = PurePosixPath(path.relative_to(folder).as_posix())
        if relative.is_absolute() or ".." in relative.parts or not path.resolve().is_relative_to(root):
            raise InvalidArtifact(f"remote file name {relative} leaves its folder")


def _name_from_repo(repo_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", repo_id.split("/", 1)[1]).strip("-.")
    return name or "adapter"


def _version_key(tag: str) -> tuple[int, str]:
    digits = tag[1:] if tag.startswith("v") else ""
    return (int(digits), tag) if digits.isdigit() else (1 << 30, tag)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _evict_snapshot(folder: Path) -> None:
    """Drop a bad snapshot and the blobs it links to from the Hub cache, so the next pull downloads afresh."""
    for path in folder.rglob("*"):
        if path.is_symlink():
            path.resolve().unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
