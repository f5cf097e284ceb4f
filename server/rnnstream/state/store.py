"""The interface every session store implements."""

from __future__ import annotations

import abc
import time

from .record import SaveResult, SessionRecord


def now_ms() -> int:
    return int(time.time() * 1000)


class SessionStore(abc.ABC):
    """Keeps session records under a per-session idle TTL.

    Methods are blocking and thread-safe. Stores raise StoreUnavailable when the
    backend cannot be reached within their timeout.
    """

    description = "store"

    @abc.abstractmethod
    def create(self, record: SessionRecord) -> bool:
        """Insert record unless its session id exists; return whether it was inserted.

        A session that exists with the record's non-empty reply_tag counts as
        inserted: it is this same create, re-sent after a timeout.
        """

    @abc.abstractmethod
    def load_many(self, session_ids: list[str]) -> list[SessionRecord | None]:
        """Read sessions in one round trip; None for a missing or expired one. Does not refresh TTLs."""

    @abc.abstractmethod
    def save_many(self, updates: list[tuple[SessionRecord, int]]) -> list[SaveResult]:
        """Write each record if its session is still at the paired expected position.

        A write refreshes the session's idle TTL. The batch is one round trip but
        each write succeeds or fails on its own.
        """

    @abc.abstractmethod
    def delete(self, session_id: str) -> bool:
        """Remove a session; return whether it existed."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable unless the backend accepts writes."""

    def load(self, session_id: str) -> SessionRecord | None:
        return self.load_many([session_id])[0]

    def save(self, record: SessionRecord, expected_position: int) -> SaveResult:
        return self.save_many([(record, expected_position)])[0]

    def close(self) -> None:
        """Release connections."""
