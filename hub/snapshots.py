"""Where a base model's files are: a local path, or a Hub model id downloaded into HUB_HOME's cache.

``model_files("ORG/NAME@REVISION")`` works like transformers' ``from_pretrained``: it asks the Hub (HF_ENDPOINT)
which commit the revision names, downloads the files that are not cached yet (with progress bars) into
``<HUB_HOME>/cache/hf`` and returns that snapshot folder. With HF_HUB_OFFLINE=1, or when the Hub cannot be
reached, it uses a snapshot already cached there or in the user's own Hugging Face cache. Only weights
(safetensors, never pickles), configs and tokenizer files are fetched. Downloads never land outside HUB_HOME:
huggingface_hub places every file under the cache by its commit and relative name, and the revision is checked
here before it becomes part of a path.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from hub.config import load_settings
from hub.errors import NotFound, PermissionDenied, RemoteError

# ORG/NAME with an optional @REVISION (branch, tag or commit; branches may hold "/", as in refs/pr/1).
MODEL_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.\-/]+))?$")
# What from_pretrained needs: configs, safetensors weights, tokenizer files. Pickled weights are never fetched.
BASE_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def probe(path: Path) -> bool:
    """Whether ``path`` exists, telling a permission problem apart from a missing file (``Path.exists`` says
    False for both). Raises PermissionDenied."""
    try:
        os.stat(path)
    except PermissionError:
        raise PermissionDenied(f"cannot read {path}: permission denied") from None
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            return False
        raise
    return True


def parse_model_id(text: str) -> tuple[str, str | None] | None:
    """``("ORG/NAME", revision or None)`` for ``ORG/NAME[@REVISION]``, None for anything else."""
    match = MODEL_ID.match(text)
    if match is None:
        return None
    revision = match["revision"]
    if revision is not None and (".." in revision.split("/") or revision.startswith("/") or revision.endswith("/")):
        return None
    return match["repo"], revision


def model_files(name_or_path: str | os.PathLike[str], *, cache_dir: Path | None = None) -> Path:
    """The local path of a base model: ``name_or_path`` itself when it exists, else the snapshot of the Hub
    model id ``ORG/NAME[@REVISION]`` (downloaded into ``<cache_dir>/hf`` when not cached; ``cache_dir`` defaults
    to ``<HUB_HOME>/cache``).

    Raises NotFound (no such path, repository or revision; offline and not cached), PermissionDenied, RemoteError
    (the Hub failed and nothing is cached).
    """
    path = Path(name_or_path).expanduser()
    if probe(path):
        return path
    parsed = parse_model_id(name_or_path) if isinstance(name_or_path, str) else None
    if parsed is None:
        raise NotFound(f"no model folder or file at {path} (nor is {str(name_or_path)!r} a Hub model id"
                       " ORG/NAME[@REVISION])")
    repo_id, revision = parsed
    hf_cache = (Path(cache_dir) if cache_dir is not None else load_settings().cache_dir) / "hf"
    if _offline():
        found = cached_snapshot(repo_id, revision, hf_cache)
        if found is None:
            raise NotFound(f"{name_or_path}: HF_HUB_OFFLINE is set and the model is not in the local caches")
        return found
    return _download(repo_id, revision, hf_cache)


def _offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads the variable once at import; read it again so a change after import counts too.
    return constants.HF_HUB_OFFLINE or constants._is_true(os.environ.get("HF_HUB_OFFLINE"))


def cached_snapshot(repo_id: str, revision: str | None, hf_cache: Path) -> Path | None:
    """A complete cached snapshot: the hub's own download cache first, then the user's Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for root in (hf_cache, None):  # None: huggingface_hub's default cache (HF_HUB_CACHE)
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=root, local_files_only=True,
                                          allow_patterns=BASE_FILES))
        except (LocalEntryNotFoundError, ValueError):
            continue
    return None


def _download(repo_id: str, revision: str | None, hf_cache: Path) -> Path:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        # HF_ENDPOINT is read now, not when huggingface_hub was imported.
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=hf_cache, allow_patterns=BASE_FILES,
                                        endpoint=os.environ.get("HF_ENDPOINT") or None))
    except hf_errors.RevisionNotFoundError:
        raise NotFound(f"{where}: no such revision on the Hub") from None
    except hf_errors.RepositoryNotFoundError:
        raise NotFound(f"{repo_id}: no such model on the Hub (or no access to it)") from None
    except hf_errors.LocalEntryNotFoundError:
        # The Hub could not be reached and the hub's cache has nothing: the user's own cache may.
        found = cached_snapshot(repo_id, revision, hf_cache)
        if found is None:
            raise RemoteError(f"{where}: cannot reach the Hub and the model is not in the local caches") from None
        return found
    except hf_errors.HfHubHTTPError as exc:
        raise RemoteError(f"{where}: download failed ({str(exc).splitlines()[0]})") from None
    except PermissionError as exc:
        raise PermissionDenied(f"cannot write the download cache {exc.filename or hf_cache}: permission denied"
                               ) from None
    except OSError as exc:
        raise RemoteError(f"{where}: download failed ({exc.strerror or exc})") from None
    if not folder.resolve().is_relative_to(hf_cache.resolve()):
        raise RemoteError(f"{where}: the download landed outside the cache ({folder}); refused")
    return folder
