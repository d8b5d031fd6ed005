"""Push and pull adapter versions to and from a Hugging Face Hub (or any server speaking its API).

``client`` holds ``Remote`` (push, pull, versions, adapters); ``cards`` reads and writes model cards; ``paths``
checks repo ids, folders and revisions and owns the download folders; ``errors`` turns every client failure into
one scrubbed line. docs/remote-security.md says what a hostile server can and cannot do.
"""

from hub.remote.cards import RemoteCard, model_card
from hub.remote.client import PullResult, PushResult, Remote, RemoteVersion
from hub.remote.paths import hub_repo_name_problem, parse_remote_ref

__all__ = [
    "PullResult",
    "PushResult",
    "Remote",
    "RemoteCard",
    "RemoteVersion",
    "hub_repo_name_problem",
    "model_card",
    "parse_remote_ref",
]
