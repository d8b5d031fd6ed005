"""Every failure of a huggingface_hub call as one line the user can act on, with the server's reason, scrubbed.

huggingface_hub raises its own error classes for HTTP answers (selected by the server's ``X-Error-Code`` header),
httpx2's for the transport, ``OSError`` for local files and, for malformed answers, whatever its parsing hits
(``KeyError``, ``ValueError``). ``remote_errors`` wraps the hub's calls into it and turns each into a HubError.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

import httpx2
from huggingface_hub import errors as hf

from hub.errors import Conflict, HubError, NotFound, QueryError, RemoteError
from hub.secrets import scrub

MAX_REASON = 300

_STATUS_MEANING = {
    401: "authentication failed (check HF_TOKEN or `hf auth login`)",
    402: "payment required",
    403: "access denied",
    404: "not found",
    409: "conflict",
    412: "the repository changed meanwhile; retry",
    413: "request too large",
    429: "rate limited by the server; retry later",
}


@contextlib.contextmanager
def remote_errors(where: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub, transport and local I/O errors raised inside into one-line HubErrors about ``where``."""
    try:
        yield
    except HubError:
        raise
    except Exception as exc:  # every error of the client library becomes a HubError (no traceback: it may hold
        raise translate(exc, where, endpoint) from None  # the server's words, token included)


def translate(exc: BaseException, where: str, endpoint: str) -> HubError:
    """The HubError that says what ``exc`` means for ``where``; its message is one scrubbed line."""
    where = scrub(where)
    error = _translate(exc, where, endpoint)
    error.args = (scrub(" ".join(str(error).split())),)
    return error


def _translate(exc: BaseException, where: str, endpoint: str) -> HubError:  # noqa: PLR0911 - one case per class
    if isinstance(exc, hf.HFValidationError):
        return QueryError(f"{where}: {_first_line(exc)}")
    if isinstance(exc, hf.GatedRepoError):
        return RemoteError(f"{where}: the repository is gated; accept its conditions on {endpoint} first")
    if isinstance(exc, hf.DisabledRepoError):
        return RemoteError(f"{where}: the repository is disabled on {endpoint}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return NotFound(f"{where}: no such repository on {endpoint} (or no access to it)")
    if isinstance(exc, hf.RevisionNotFoundError):
        return NotFound(f"{where}: no such revision on {endpoint}")
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return NotFound(f"{where}: no such file on {endpoint} ({server_reason(exc) or 'not found'})")
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return RemoteError(f"{where}: cannot reach {endpoint} and the files are not downloaded yet")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return RemoteError(f"{where}: HF_HUB_OFFLINE is set and the files are not downloaded yet")
    if isinstance(exc, hf.LocalTokenNotFoundError):
        return RemoteError(f"{where}: not logged in to {endpoint}: set HF_TOKEN or run `hf auth login`")
    if isinstance(exc, hf.HfHubHTTPError):
        return _http_error(exc, where, endpoint)
    if isinstance(exc, httpx2.TimeoutException):
        return RemoteError(f"{where}: {endpoint} did not answer in time")
    if isinstance(exc, httpx2.ConnectError):
        return RemoteError(f"{where}: cannot connect to {endpoint} ({_first_line(exc)})")
    if isinstance(exc, (httpx2.HTTPError, httpx2.InvalidURL, hf.FileMetadataError)):
        return RemoteError(f"{where}: transfer from {endpoint} failed ({_first_line(exc)})")
    if isinstance(exc, OSError):
        return _os_error(exc, where, endpoint)
    if isinstance(exc, (KeyError, ValueError, TypeError, AttributeError, IndexError)):
        # huggingface_hub indexes the server's JSON directly: a missing key or wrong type lands here.
        return RemoteError(f"{where}: {endpoint} sent an answer the client cannot use "
                           f"({type(exc).__name__}: {_first_line(exc)})")
    return RemoteError(f"{where}: {type(exc).__name__}: {_first_line(exc)}")


def _http_error(exc: hf.HfHubHTTPError, where: str, endpoint: str) -> HubError:
    status = exc.response.status_code if exc.response is not None else None
    reason = server_reason(exc)
    meaning = _STATUS_MEANING.get(status) or (f"server error {status}" if status and status >= 500
                                              else f"HTTP {status}" if status else "HTTP error")
    if status == 400 or isinstance(exc, hf.BadRequestError):
        return QueryError(f"{where}: {endpoint} refused the request: {reason or 'bad request'}")
    text = f"{where}: {meaning}" + (f" ({reason})" if reason and reason.lower() != meaning.lower() else "")
    if status in (409, 412):
        return Conflict(text)
    if status == 404:
        return NotFound(text)
    return RemoteError(text)


def _os_error(exc: OSError, where: str, endpoint: str) -> HubError:
    """Local file errors name what failed; an OSError without errno is huggingface_hub's word for a bad transfer
    ("Consistency check failed: file should be of size ...")."""
    target = f" {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HubError(f"{where}: the disk is full (writing{target or ' downloads'})")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return HubError(f"{where}: permission denied writing{target or ' downloads'}")
    if exc.errno is not None:
        return HubError(f"{where}: cannot write{target}: {exc.strerror or _first_line(exc)}")
    return RemoteError(f"{where}: transfer from {endpoint} failed ({_first_line(exc)})")


def server_reason(exc: hf.HfHubHTTPError) -> str:
    """The server's own words for an error (its JSON ``error``, else the HTTP reason phrase): first line, at most
    ``MAX_REASON`` characters, printable, scrubbed."""
    candidates = [exc.server_message, exc.response.reason_phrase if exc.response is not None else None]
    for text in candidates:
        if isinstance(text, str):
            line = next((part.strip() for part in text.splitlines() if part.strip()), "")
            line = "".join(c if c.isprintable() else " " for c in line)
            if line:
                return scrub(line[:MAX_REASON])
    return ""


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return scrub("".join(c if c.isprintable() else " " for c in text)[:MAX_REASON])
