"""Names that reach a Hub server, and the local folders that hold what it sends.

Everything a user types (repo ids, subfolders, revisions) is checked here before any network call, with
huggingface_hub's own validator where it has one. Nothing a server sends ever names a local path: downloads land in
``Downloads`` folders whose names the hub derives itself (a hash of the endpoint, the validated repo id, a commit
id checked to be 40 hex digits).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from hub.errors import QueryError

# Tags the hub writes for versions; they never move once written.
VERSION_TAG = re.compile(r"^v[0-9]+$")  # ASCII digits only: \d also matches "v١"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Folder names inside a repo: the characters Hub repo names use; no '.' or '..' parts, no backslashes.
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,99}$")
MAX_SUBFOLDER_DEPTH = 8
MAX_REVISION_LENGTH = 200


def hub_repo_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be the NAME of a Hub repo ``ORG/NAME`` as is, or None when it can.

    The rules are huggingface_hub's (``validate_repo_id``): 1 to 96 letters, digits, '-', '_' or '.', not starting
    or ending with '-' or '.', no '--' or '..', not ending in '.git'.
    """
    try:
        validate_repo_id(name)
    except HFValidationError:
        pass
    else:
        if "/" in name:
            return "contains '/'"
        return None if name.isascii() else "uses characters other than letters, digits, '-', '_' and '.'"
    if not isinstance(name, str) or not name:
        return "is empty"
    if "/" in name:
        return "contains '/'"
    if len(name) > 96:
        return f"is {len(name)} characters long (at most 96)"
    if "--" in name or ".." in name:
        return "contains '--' or '..'"
    if name[0] in "-." or name[-1] in "-.":
        return "starts or ends with '-' or '.'"
    if name.endswith(".git"):
        return "ends with '.git'"
    return "uses characters other than letters, digits, '-', '_' and '.'"


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``ORG/NAME``; QueryError (one line) otherwise."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise QueryError(f"{repo_id!r} is not a Hub repository id (ORG/NAME)")
    for part, what in zip(repo_id.split("/"), ("organization", "name"), strict=True):
        problem = hub_repo_name_problem(part)
        if problem:
            raise QueryError(f"{repo_id!r} is not a Hub repository id: the {what} {part!r} {problem}")
    return repo_id


def is_hub_model_id(text: str | None) -> bool:
    """Whether ``text`` can name a model on the Hub (``gpt2``, ``ORG/NAME``) and is not a folder on this machine."""
    if not isinstance(text, str) or text.startswith((".", "~", "/")) or os.path.exists(text):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_subfolder(subfolder: str | None) -> str | None:
    """A folder inside a repo (``experts/math``), or None for the repo's root."""
    if subfolder is None or subfolder.strip("/") == "":
        return None
    parts = subfolder.strip("/").split("/")
    if len(parts) > MAX_SUBFOLDER_DEPTH or not all(_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise QueryError(f"invalid folder {subfolder!r} in a Hub repo: use names of letters, digits, '_', '.', "
                         f"'-', '+', '=' separated by '/' (at most {MAX_SUBFOLDER_DEPTH} deep)")
    return "/".join(parts)


def check_revision(revision: str | None) -> str:
    """A branch, tag or commit id (``main`` when None). It only travels in URLs, quoted; it never names a file."""
    if revision is None or revision == "":
        return "main"
    if (not isinstance(revision, str) or len(revision) > MAX_REVISION_LENGTH
            or not revision.isprintable() or any(c.isspace() for c in revision)):
        raise QueryError(f"invalid revision {revision!r}: a branch, tag or commit id without spaces "
                         f"(at most {MAX_REVISION_LENGTH} characters)")
    return revision


def parse_remote_ref(text: str) -> tuple[str, str | None, str | None]:
    """``ORG/NAME[/PATH][@REVISION]`` → (repo_id, subfolder or None, revision or None).

    >>> parse_remote_ref("alice/experts/math@v2")
    ('alice/experts', 'math', 'v2')
    """
    if not isinstance(text, str):
        raise QueryError(f"invalid Hub reference {text!r}")
    location, sep, revision = text.partition("@")
    if sep and not revision:
        raise QueryError(f"invalid Hub reference {text!r}: nothing after '@'")
    parts = location.strip("/").split("/", 2)
    if len(parts) < 2:
        raise QueryError(f"invalid Hub reference {text!r}: expected ORG/NAME[/FOLDER][@REVISION]")
    repo_id = check_repo_id("/".join(parts[:2]))
    subfolder = check_subfolder(parts[2]) if len(parts) == 3 else None
    return repo_id, subfolder, check_revision(revision) if sep else None


def remote_location(repo_id: str, subfolder: str | None) -> str:
    """How the registry records where a version came from: ``ORG/NAME`` or ``ORG/NAME/FOLDER``."""
    return f"{repo_id}/{subfolder}" if subfolder else repo_id


class Downloads:
    """The hub's own download folders for one repo on one endpoint::

        <root>/<hash of endpoint>/<org>--<name>/
            refs/<hash of revision>     the commit a branch or tag pointed at when last seen (for offline pulls)
            commits/<commit id>/        files downloaded at that commit (huggingface_hub's ``local_dir`` mode)
            hf-cache/                   never written; given to huggingface_hub so it never reads a shared cache

    ``check_repo_id`` forbids '--' in repo ids, so ``<org>--<name>`` names one repo.
    """

    def __init__(self, root: Path, endpoint: str, repo_id: str) -> None:
        self.root = Path(root)
        endpoint_key = hashlib.sha256(endpoint.encode()).hexdigest()[:16]
        self.folder = self.root / endpoint_key / check_repo_id(repo_id).replace("/", "--")
        self.hf_cache = self.folder / "hf-cache"

    def commit_folder(self, commit: str) -> Path:
        if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
            raise QueryError(f"{str(commit)[:80]!r} is not a commit id (40 lowercase hex digits)")
        return self.folder / "commits" / commit

    def remember_revision(self, revision: str, commit: str) -> None:
        path = self._ref_path(revision)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(self.commit_folder(commit).name)
        os.replace(staging, path)  # readers see the old commit or the new one, never half of it

    def recall_revision(self, revision: str) -> str | None:
        """The commit ``revision`` last resolved to, if it was seen (a commit id resolves to itself)."""
        if COMMIT.fullmatch(revision):
            return revision
        try:
            commit = self._ref_path(revision).read_text().strip()
        except OSError:
            return None
        return commit if COMMIT.fullmatch(commit) else None

    def evict(self, commit: str) -> None:
        """Drop what was downloaded at ``commit`` (a bad or partial copy), so the next pull downloads it afresh."""
        remove_inside(self.commit_folder(commit), self.root)

    def _ref_path(self, revision: str) -> Path:
        return self.folder / "refs" / hashlib.sha256(revision.encode()).hexdigest()[:32]


def remove_inside(path: Path, root: Path) -> None:
    """Remove ``path`` (a file, a link, or a folder and what it holds) if it lies inside ``root``; anything else
    is left alone. A link is removed itself, never what it points at; ``shutil.rmtree`` does not follow links."""
    if not path.is_symlink() and not path.exists():
        return
    if not path.parent.resolve().is_relative_to(Path(root).resolve()):
        return
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
