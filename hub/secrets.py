"""Keep credentials out of everything the hub prints or logs.

``scrub(text)`` masks the Hub token in use whatever its source (a ``token=`` argument the hub was given, ``HF_TOKEN``,
the login stored by ``hf auth login``), anything shaped like a bearer or Hub token, and the password part of URLs
such as ``postgresql://user:password@host/db``. Servers are not trusted to keep them out of their answers: a
hostile or buggy one may echo the Authorization header in an error message or an HTTP reason phrase.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import quote

MASK = "***"
# Shorter strings are no credible secret, and masking them would garble every message they happen to occur in.
MIN_SECRET_LENGTH = 6
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

_remembered: set[str] = set()
_PATTERNS = [
    # "Authorization: Bearer <token>" and the like, whatever the token looks like.
    (re.compile(r"(?i)\b(bearer\s+)[^\s'\",;)\]}]+"), rf"\g<1>{MASK}"),
    # Hub user and organization tokens (hf_ + 30 or more letters and digits; api_org_ + the same).
    (re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{30,}"), rf"\g<1>{MASK}"),
    # scheme://user:password@host: keep the user and host, drop the password.
    (re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s@/]+@"), rf"\g<1>{MASK}@"),
    # ?token=... / &password=... in URLs.
    (re.compile(r"(?i)([?&](?:token|access_token|password|api_key)=)[^&\s'\"]+"), rf"\g<1>{MASK}"),
]


def remember(secret: str | None) -> None:
    """Mask ``secret`` in every later ``scrub`` of this process (for tokens passed as arguments, not read from the
    environment)."""
    if isinstance(secret, str) and len(secret) >= MIN_SECRET_LENGTH:
        _remembered.add(secret)


def known_secrets() -> set[str]:
    """The literal secrets this process may hold: remembered ones, the token variables, the stored Hub login and
    the password of ``HUB_DATABASE_URL``."""
    found = set(_remembered)
    found.update(os.environ.get(name) or "" for name in TOKEN_VARIABLES)
    found.add(_stored_token() or "")
    found.add(_url_password(os.environ.get("HUB_DATABASE_URL") or "") or "")
    return {s for s in found if len(s) >= MIN_SECRET_LENGTH}


def scrub(text: str) -> str:
    """``text`` with every known secret and everything that looks like a credential replaced by ``***``."""
    text = str(text)
    for secret in sorted(known_secrets(), key=len, reverse=True):  # longest first: one may contain another
        for form in {secret, quote(secret, safe="")}:
            text = text.replace(form, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class ScrubFilter(logging.Filter):
    """Scrubs a log record's message in place (the text formatted with its arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub(record.getMessage()), ()
        return True


_FILTER = ScrubFilter()


def scrub_logs(*prefixes: str) -> None:
    """Scrub every record of the loggers named ``prefix`` or ``prefix.*`` that exist now (a logger's filters do not
    apply to its children's records, so each gets the filter). HTTP libraries log reason phrases and headers at
    INFO and DEBUG, and a server may put the token in its reason phrase."""
    names = [name for name in list(logging.root.manager.loggerDict)
             if any(name == p or name.startswith(f"{p}.") for p in prefixes)]
    for name in {*names, *prefixes}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def _stored_token() -> str | None:
    # huggingface_hub is imported here, not at the top: the CLI's error printer scrubs every message, and most
    # commands never need huggingface_hub.
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # an unreadable token file must not turn an error message into a crash
        return None


def _url_password(url: str) -> str | None:
    match = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/:@]*:([^@/]+)@", url)
    return match[1] if match else None
