"""What a request can run into besides the hub's own errors; each maps to one HTTP status at the edge (app.py)."""

from __future__ import annotations

from hub.errors import HubError


class InvalidRequest(HubError):
    """A request the server cannot run as asked: a parameter out of range, a prompt too long, a chat template that
    refuses the messages (HTTP 400)."""


class Overloaded(HubError):
    """The waiting queue is full (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(HubError):
    """The model is still loading, failed to load, or the server is shutting down (HTTP 503)."""


class Unauthorized(HubError):
    """No API key, or the wrong one (HTTP 401)."""
