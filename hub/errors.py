"""The hub's exception hierarchy.

Every error a user can cause is a ``HubError``; the CLI prints its message on one line and exits 1.
"""


class HubError(Exception):
    """Base class of every error the hub raises on purpose."""


class NotFound(HubError):
    """A name, version, alias, digest or file that does not exist."""


class Incompatible(HubError):
    """Adapters, bases or compositions that cannot go together."""


class InvalidArtifact(HubError):
    """An adapter folder or file that is malformed, unsafe or contradicts itself."""


class IntegrityError(HubError):
    """Content whose digest does not match what was promised."""


class Conflict(HubError):
    """A write that clashes with existing state (an alias taken, a concurrent change)."""


class RemoteError(HubError):
    """A failure talking to a Hub server: network, authentication, rate limits."""


class DatabaseError(HubError):
    """A registry database that cannot be opened or is at the wrong schema revision."""


class QueryError(HubError):
    """A malformed name, reference, alias, metric or query condition (``math@``, ``accuracy>>0.8``)."""


class PermissionDenied(HubError):
    """A file or folder the operating system does not let the hub read or write."""
