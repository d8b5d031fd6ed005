"""A local Hugging Face Hub-compatible HTTP server for tests (standard library only).

It answers the subset of the Hub HTTP API that huggingface_hub's HfApi, hf_hub_download and snapshot_download use
(see /work/shared/reference/hub-http-api.md). Every upload is answered "regular", so file contents travel base64
inline in the NDJSON commit: no LFS, no Xet. Repos live in memory; each commit holds a full snapshot of its files.

    with HubServer(tokens={"hf_test": "alice"}) as server:
        api = HfApi(endpoint=server.url, token="hf_test")

Hostile modes, for tests that the client survives a server that lies or attacks: `set_download_headers` (ETags or
commit headers with path traversal), `fail_next` with a reason phrase or message that may echo the request's
Authorization header (`{authorization}`) and any JSON body (a 409 without "url"), `seed` to place files no client
upload would produce (60 MB cards), and the card makers at the end of this module (many keys, alias bombs, deep
nesting).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# The real Hub starts every repo with a .gitattributes commit; clients must cope with that extra file.
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as `oid` / ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _clean_path(path: str) -> str:
    """A repo-relative file path, refusing anything that could escape a checkout ('..', absolute, empty parts)."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise _HttpError(400, f"Invalid path in repo: {path!r}")
    return path


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, *,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra, self.reason = headers or {}, extra or {}, reason


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None  # send only this many body bytes, then drop the connection
    reason: str | None = None  # the HTTP reason phrase; None: the standard one


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: datetime
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: datetime
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit:
        """A branch, a tag (optionally as refs/heads/x, refs/tags/x) or a full commit id."""
        if rev.startswith("refs/heads/"):
            oid = self.branches.get(rev[len("refs/heads/"):])
        elif rev.startswith("refs/tags/"):
            oid = self.tags.get(rev[len("refs/tags/"):])
        else:
            oid = self.branches.get(rev) or self.tags.get(rev) or (rev if _HEX40.match(rev) else None)
        if oid is None or oid not in self.commits:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self.commits[oid]

    def branch(self, rev: str) -> str:
        """The branch a write targets; tags and commit ids cannot be committed to."""
        name = rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev
        if name not in self.branches:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return name


class HubServer:
    """An in-memory Hub on 127.0.0.1 (random port), served from a background thread until `stop()`.

    `tokens` maps a bearer token to its user name. A user may write (create/delete repos, commit, tag) only under
    their own namespace; private repos are visible to their owner only (404 RepoNotFound for everyone else).
    """

    def __init__(self, *, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.requests: list[tuple[str, str]] = []  # (method, unquoted path without query), in arrival order
        self.received_bytes = 0  # request body bytes received on preupload + commit routes
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._corrupt: set[tuple[str, str, str]] = set()
        self._cuts: dict[tuple[str, str, str], list[int]] = {}  # key -> [after_bytes, times left]
        self._failures: list[dict[str, Any]] = []  # fail_next's arguments, "times" counting down
        self._download_headers: dict[tuple[str, str, str], dict[str, str]] = {}
        self._connections: set[socket.socket] = set()
        self._httpd = _HTTPServer(self)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # A short poll interval keeps stop() fast (shutdown waits for the next poll).
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hubserver", daemon=True)
        self._thread.start()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections, so clients see a dead server at once (idempotent)."""
        if not self._thread.is_alive():
            return
        self._httpd.shutdown()
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()
        self._thread.join()

    # ---- fault injection and inspection (for tests) ----

    def corrupt(self, repo_id: str, path: str, *, repo_type: str = "model") -> None:
        """Serve `path` with its last byte flipped (same size, same ETag), as if damaged in storage or transit."""
        with self._lock:
            self._corrupt.add((repo_type, repo_id, path))

    def cut_next_download(self, repo_id: str, path: str, after_bytes: int, *, times: int = 1,
                          repo_type: str = "model") -> None:
        """The next `times` GETs of `path` send `after_bytes` body bytes, then the connection is dropped."""
        with self._lock:
            self._cuts[(repo_type, repo_id, path)] = [after_bytes, times]

    def fail_next(self, status: int, path_contains: str, *, times: int = 1, message: str | None = None,
                  reason: str | None = None, body: dict[str, Any] | None = None, code: str | None = None,
                  method: str | None = None) -> None:
        """The next `times` requests (of `method`, if given) whose unquoted path contains `path_contains` get
        `status` with JSON `{"error": message, **body}`, the HTTP reason phrase `reason` and the X-Error-Code `code`.
        In `message` and `reason`, `{authorization}` becomes the request's Authorization header (a server that
        echoes credentials)."""
        with self._lock:
            self._failures.append(dict(status=status, path=path_contains, times=times, method=method,
                                       message=message or f"Injected failure {status}", reason=reason,
                                       body=body or {}, code=code))

    def set_download_headers(self, repo_id: str, path: str, headers: dict[str, str], *,
                             repo_type: str = "model") -> None:
        """Answer HEAD/GET of `path` with these headers replacing the real ones (a lying ETag, X-Repo-Commit...)."""
        with self._lock:
            self._download_headers[(repo_type, repo_id, path)] = dict(headers)

    def clear_faults(self) -> None:
        with self._lock:
            self._corrupt.clear()
            self._cuts.clear()
            self._failures.clear()
            self._download_headers.clear()

    def seed(self, repo_id: str, files: dict[str, bytes], *, tags: tuple[str, ...] = (), branch: str = "main",
             user: str = "seed") -> str:
        """Commit `files` (added to the branch's current ones) straight into the store, without HTTP or path
        checks, and point `tags` at the commit; creates the repo if needed. Returns the commit id."""
        with self._lock:
            repo = self._repos.get(("model", repo_id))
            if repo is None:
                repo = Repo("model", repo_id, False, datetime.now(timezone.utc))
                repo.branches[branch] = self._new_commit(repo, None, "initial commit", "", user,
                                                         {".gitattributes": GITATTRIBUTES}).oid
                self._repos[("model", repo_id)] = repo
            head = repo.commits[repo.branches[branch]]
            commit = self._new_commit(repo, head.oid, "seed", "", user, {**head.files, **files})
            repo.branches[branch] = commit.oid
            for tag in tags:
                repo.tags[tag] = commit.oid
            return commit.oid

    def resolve(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """The commit id a revision points at (KeyError if the repo is unknown)."""
        with self._lock:
            return self._repos[(repo_type, repo_id)].resolve(revision).oid

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """The stored files at a revision, as the server holds them (uncorrupted)."""
        with self._lock:
            return dict(self._repos[(repo_type, repo_id)].resolve(revision).files)

    # ---- request handling ----

    def _handle(self, method: str, raw: str, query: str, headers: Any, body: bytes) -> _Response:
        path = unquote(raw)
        self.requests.append((method, path))
        parts = raw.strip("/").split("/")
        with self._lock:
            if parts[0] == "api" and len(parts) >= 5 and parts[4] in ("preupload", "commit"):
                self.received_bytes += len(body)
            for failure in self._failures:
                if failure["path"] in path and failure["method"] in (None, method):
                    failure["times"] -= 1
                    if failure["times"] <= 0:
                        self._failures.remove(failure)
                    auth = headers.get("Authorization") or ""
                    reason = failure["reason"].replace("{authorization}", auth) if failure["reason"] else None
                    raise _HttpError(failure["status"], failure["message"].replace("{authorization}", auth),
                                     failure["code"], extra=failure["body"], reason=reason)
            user = self._user(headers)
            if parts[0] == "api":
                return self._api(method, parts[1:], parse_qs(query), user, headers, body)
            return self._download(method, parts, headers, user)

    def _user(self, headers: Any) -> str | None:
        auth = headers.get("Authorization")
        if auth is None:
            return None
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if token not in self.tokens:  # the real Hub rejects a bad token even on public reads
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _repo(self, repo_type: str, repo_id: str, user: str | None, *, write: bool = False) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            raise _HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if write:
            self._check_writer(repo_type, repo_id, user)
        return repo

    @staticmethod
    def _check_writer(repo_type: str, repo_id: str, user: str | None) -> None:
        if user is None:
            raise _HttpError(401, "You must be authenticated to write to the Hub")
        if repo_id.split("/")[0] != user:
            raise _HttpError(403, f"You don't have the rights to write to {repo_type} {repo_id}")

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _api(self, method: str, parts: list[str], query: dict[str, list[str]], user: str | None,
             headers: Any, body: bytes) -> _Response:
        match (method, parts):
            case ("GET", ["whoami-v2"]):
                if user is None:
                    raise _HttpError(401, "Invalid credentials in Authorization header")
                token_info = {"displayName": "test", "role": "write"}  # never the token itself
                return _json({"type": "user", "name": user, "fullname": user, "orgs": [],
                              "auth": {"type": "access_token", "accessToken": token_info}})
            case ("POST", ["validate-yaml"]):
                content = _load(body).get("content", "")
                if content.startswith("---") and "\n---" not in content[3:]:
                    return _json({"errors": [{"message": "unterminated YAML front matter"}], "warnings": []}, 400)
                return _json({"errors": [], "warnings": []})
            case ("POST", ["repos", "create"]):
                return self._create_repo(_load(body), user)
            case ("DELETE", ["repos", "delete"]):
                payload = _load(body)
                if user is None:
                    raise _HttpError(401, "You must be authenticated to delete a repo")
                repo_type = payload.get("type") or "model"
                repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
                self._repo(repo_type, repo_id, user, write=True)
                del self._repos[(repo_type, repo_id)]
                return _json({})
            case (_, [plural, ns, name, *rest]) if plural in REPO_TYPES:
                repo_id = f"{unquote(ns)}/{unquote(name)}"
                return self._repo_api(method, REPO_TYPES[plural], repo_id, [unquote(p) for p in rest],
                                      query, user, headers, body)
        raise _HttpError(404, f"Not found: {method} /api/{'/'.join(parts)}")

    def _create_repo(self, payload: dict[str, Any], user: str | None) -> _Response:
        name, repo_type = payload.get("name") or "", payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise _HttpError(400, f"Invalid repo type: {repo_type}")
        namespace = payload.get("organization") or user
        if user is None:
            raise _HttpError(401, "You must be authenticated to create a repo")
        if not _NAME.match(name) or ".." in name or "--" in name or not _NAME.match(namespace):
            raise _HttpError(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        self._check_writer(repo_type, repo_id, user)
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:  # the client reads "url" even from the 409 when exist_ok=True
            raise _HttpError(409, "You already created this repo", extra={"url": self._repo_url(existing)})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_type, repo_id, private, datetime.now(timezone.utc))
        repo.branches["main"] = self._new_commit(repo, None, "initial commit", "", user,
                                                 {".gitattributes": GITATTRIBUTES}).oid
        self._repos[(repo_type, repo_id)] = repo
        return _json({"url": self._repo_url(repo), "name": repo_id})

    def _new_commit(self, repo: Repo, parent: str | None, title: str, message: str, author: str,
                    files: dict[str, bytes]) -> Commit:
        self._counter += 1
        date = datetime.now(timezone.utc)
        tree = sorted((p, git_blob_sha1(d)) for p, d in files.items())
        seed = json.dumps([repo.repo_id, parent, title, message, _iso(date), tree, self._counter])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, author, date, files)
        repo.commits[commit.oid] = commit
        return commit

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict[str, list[str]],
                  user: str | None, headers: Any, body: bytes) -> _Response:
        writes = {("POST", "preupload"), ("POST", "commit"), ("POST", "tag"), ("DELETE", "tag")}
        repo = self._repo(repo_type, repo_id, user, write=(method, rest[0] if rest else "") in writes)
        match (method, rest):
            case ("GET", []):
                return self._info(repo, repo.resolve("main"))
            case ("GET", ["revision", rev]):
                return self._info(repo, repo.resolve(rev))
            case ("GET", ["tree", rev, *sub]):
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return _json(self._tree(repo.resolve(rev), "/".join(sub), recursive))
            case ("POST", ["paths-info", rev]):
                commit = repo.resolve(rev)
                is_json = headers.get("Content-Type", "").startswith("application/json")
                paths = _load(body).get("paths", []) if is_json else parse_qs(body.decode()).get("paths", [])
                entries = {e["path"]: e for e in self._tree(commit, "", True)}
                return _json([entries[p] for p in paths if p in entries])
            case ("GET", ["refs"]):
                def ref(kind: str, name: str, oid: str) -> dict[str, str]:
                    return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}
                return _json({"branches": [ref("heads", n, o) for n, o in repo.branches.items()],
                              "tags": [ref("tags", n, o) for n, o in repo.tags.items()],
                              "converts": [], "pullRequests": []})
            case ("GET", ["commits", rev]):
                history, commit = [], repo.resolve(rev)
                while True:
                    history.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                                    "date": _iso(commit.date), "authors": [{"user": commit.author}]})
                    if commit.parent is None:
                        return _json(history)
                    commit = repo.commits[commit.parent]
            case ("POST", ["preupload", rev]):
                current = repo.commits[repo.branches[repo.branch(rev)]].files
                answers = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                            "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None}
                           for f in _load(body).get("files", [])]
                return _json({"files": answers})
            case ("POST", ["commit", rev]):
                return self._commit(repo, repo.branch(rev), body, user or "")
            case ("POST", ["tag", rev]):
                tag = _load(body).get("tag") or ""
                if not _NAME.match(tag):
                    raise _HttpError(400, f"Invalid tag name: {tag!r}")
                if tag in repo.tags or tag in repo.branches:
                    raise _HttpError(409, f"Tag {tag} already exists")
                repo.tags[tag] = repo.resolve(rev).oid
                return _json({})
            case ("DELETE", ["tag", tag]):
                if repo.tags.pop(tag, None) is None:
                    raise _HttpError(404, f"Tag not found: {tag}", "RevisionNotFound")
                return _json({})
        raise _HttpError(404, f"Not found: {method} {'/'.join(rest)} on {repo_id}")

    def _info(self, repo: Repo, commit: Commit) -> _Response:
        siblings = [{"rfilename": p, "size": len(d), "blobId": git_blob_sha1(d)}
                    for p, d in sorted(commit.files.items())]
        return _json({"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                      "author": repo.repo_id.split("/")[0], "sha": commit.oid, "private": repo.private,
                      "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                      "createdAt": _iso(repo.created), "lastModified": _iso(commit.date), "siblings": siblings})

    @staticmethod
    def _tree(commit: Commit, sub: str, recursive: bool) -> list[dict[str, Any]]:
        """Tree entries under `sub` (directories first, like the Hub); 404 EntryNotFound if `sub` is no folder."""
        dirs = {"/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)}
        if sub and sub not in dirs:
            raise _HttpError(404, f"Folder not found: {sub}", "EntryNotFound")
        prefix = f"{sub}/" if sub else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        entries = [{"type": "directory", "path": d, "oid": hashlib.sha1(f"tree {d}".encode()).hexdigest(), "size": 0}
                   for d in sorted(dirs) if wanted(d)]
        return entries + [{"type": "file", "path": p, "oid": git_blob_sha1(d), "size": len(d)}
                          for p, d in sorted(commit.files.items()) if wanted(p)]

    def _commit(self, repo: Repo, branch: str, body: bytes, user: str) -> _Response:
        head = repo.commits[repo.branches[branch]]
        files, header = dict(head.files), None
        for line in body.splitlines():
            if not line.strip():
                continue
            item = _load(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HttpError(400, "Only base64 file content is supported")
                files[_clean_path(value.get("path", ""))] = base64.b64decode(value.get("content", ""), validate=True)
            elif key == "deletedFile":
                if files.pop(_clean_path(value.get("path", "")), None) is None:
                    raise _HttpError(404, f"File not found: {value.get('path')}", "EntryNotFound")
                # Git has no empty folders: nothing else to do.
            elif key == "deletedFolder":
                folder = _clean_path(value.get("path", "").rstrip("/")) + "/"
                doomed = [p for p in files if p.startswith(folder)]
                if not doomed:
                    raise _HttpError(404, f"Folder not found: {folder}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            elif key == "lfsFile":
                raise _HttpError(400, "LFS files are not supported by this server (preupload answers regular)")
            else:
                raise _HttpError(400, f"Unknown commit operation: {key!r}")
        if header is None or not header.get("summary"):
            raise _HttpError(400, "Commit header with a summary is required")
        if header.get("parentCommit") and header["parentCommit"] != head.oid:
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
        commit = self._new_commit(repo, head.oid, header["summary"], header.get("description") or "", user, files)
        repo.branches[branch] = commit.oid
        return _json({"success": True, "commitOid": commit.oid,
                      "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}", "hookOutput": ""})

    def _download(self, method: str, parts: list[str], headers: Any, user: str | None) -> _Response:
        """HEAD/GET /{prefix}{ns}/{name}/resolve/{rev}/{path}: file bytes with X-Repo-Commit and ETag."""
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(parts[0], "model")
        if repo_type != "model":
            parts = parts[1:]
        if len(parts) < 5 or parts[2] != "resolve" or method not in ("GET", "HEAD"):
            raise _HttpError(404, "Not found")
        repo_id, rev = f"{unquote(parts[0])}/{unquote(parts[1])}", unquote(parts[3])
        path = _clean_path("/".join(unquote(p) for p in parts[4:]))
        commit = self._repo(repo_type, repo_id, user).resolve(rev)
        if path not in commit.files:  # X-Repo-Commit lets the client cache the miss
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        stored = commit.files[path]
        key = (repo_type, repo_id, path)
        data = stored[:-1] + bytes([stored[-1] ^ 0xFF]) if key in self._corrupt and stored else stored
        out = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha1(stored)}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream", **self._download_headers.get(key, {})}
        status, wanted = 200, headers.get("Range")
        if wanted:
            match = _RANGE.match(wanted.strip())
            if match is None or int(match[1]) >= max(len(data), 1):
                raise _HttpError(416, f"Unsatisfiable range: {wanted}",
                                 headers={"Content-Range": f"bytes */{len(data)}"})
            start, end = int(match[1]), min(int(match[2] or len(data) - 1), len(data) - 1)
            status, data = 206, data[start:end + 1]
            out["Content-Range"] = f"bytes {start}-{end}/{len(stored)}"
        cut = self._cuts.get(key)
        cut_after = None
        if method == "GET" and cut is not None:
            cut_after, cut[1] = cut[0], cut[1] - 1
            if cut[1] <= 0:
                del self._cuts[key]
        return _Response(status, data, out, cut_after)


def _load(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"{}")
    except ValueError as exc:
        raise _HttpError(400, f"Invalid JSON body: {exc}") from exc
    if not isinstance(payload, dict):
        raise _HttpError(400, "JSON body must be an object")
    return payload


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real client expects
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _dispatch(self) -> None:
        raw, _, query = self.path.partition("?")
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            self.close_connection = True  # the unread body would poison the connection
            resp = _json({"error": "Length Required"}, 411)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                resp = self.server.hub._handle(self.command, raw, query, self.headers, body)
            except _HttpError as exc:
                extra = {"X-Error-Code": exc.code} if exc.code else {}
                resp = _json({"error": exc.message, **exc.extra}, exc.status, {**exc.headers, **extra})
                resp.reason = exc.reason
            except Exception as exc:  # a server bug must reach the test as a 500, not a hang
                resp = _json({"error": f"{type(exc).__name__}: {exc}"}, 500)
        self.send_response(resp.status, resp.reason)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if resp.cut_after is None:
            self.wfile.write(resp.body)
            return
        self.wfile.write(resp.body[:resp.cut_after])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up (or our own cuts) are expected
            super().handle_error(request, client_address)


# ---- hostile model cards (README.md bytes), for `seed` ----

def huge_card(size: int) -> bytes:
    """A card of `size` bytes: small front matter, then filler text."""
    head = b"---\nlibrary_name: peft\n---\n\n"
    return head + b"x" * max(0, size - len(head))


def wide_card(keys: int) -> bytes:
    """A card whose YAML front matter has `keys` top-level keys."""
    return ("---\n" + "".join(f"k{i}: {i}\n" for i in range(keys)) + "---\n").encode()


def alias_bomb_card(levels: int = 12, width: int = 9) -> bytes:
    """A "billion laughs" card: each level is a list of `width` aliases of the level below (width**levels nodes
    once expanded, a few hundred bytes on disk)."""
    lines = ["---", 'l0: &l0 ["lol"]']
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    lines.append(f"adapter_hub: {{name: bomb, digest: '{'a' * 64}', tags: *l{levels}}}")
    return ("\n".join(lines) + "\n---\n").encode()


def deep_card(depth: int) -> bytes:
    """A card whose YAML nests `depth` flow lists."""
    return ("---\nadapter_hub: " + "[" * depth + "]" * depth + "\n---\n").encode()
