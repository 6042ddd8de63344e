"""Which key signed which request: the simulator's per-request signing log.

Every request that claims an API key (header, bearer token ``kid``) is recorded once it is answered: the
venue, the claimed key, method, path (never the query string), the wall-clock time it arrived, the HTTP
status and whether the venue authenticated it (the signature verified and the key was accepted). A test
can then assert, for instance, that no request signed with a revoked key arrived after some moment
(``Simulator.signed_requests(api_key=old, since=t)``). The log keeps the latest :data:`MAX_ENTRIES`.
The API keys in it are the simulator's own test keys; secrets and signatures are never recorded.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from venues.base import Venue

MAX_ENTRIES = 100_000
MAX_KEY_CHARS = 256  # a claimed key is recorded cut to this length (real key ids are shorter): bounded memory


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """One request that claimed ``api_key``."""

    venue: Venue
    api_key: str
    method: str
    path: str
    at: float  # wall-clock seconds since the epoch when the request arrived (time.time())
    status: int
    authenticated: bool  # the venue verified the signature and accepted the key

    def as_dict(self) -> dict[str, Any]:
        return {
            "venue": self.venue.value,
            "api_key": self.api_key,
            "method": self.method,
            "path": self.path,
            "at": self.at,
            "status": self.status,
            "authenticated": self.authenticated,
        }


class SigningLog:
    """A bounded, append-only list of :class:`SignedRequest`."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: collections.deque[SignedRequest] = collections.deque(maxlen=max_entries)

    def record(self, entry: SignedRequest) -> None:
        self._entries.append(entry)

    def query(
        self,
        *,
        venue: Venue | None = None,
        api_key: str | None = None,
        since: float | None = None,
        authenticated: bool | None = None,
    ) -> list[SignedRequest]:
        """Entries matching every given filter, oldest first; ``since`` keeps those at or after it."""
        return [
            e
            for e in self._entries
            if (venue is None or e.venue is venue)
            and (api_key is None or e.api_key == api_key)
            and (since is None or e.at >= since)
            and (authenticated is None or e.authenticated == authenticated)
        ]

    def clear(self) -> None:
        self._entries.clear()
