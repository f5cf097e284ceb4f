"""The in-process session store: one process, sessions lost on restart.

Expired sessions are dropped when read and by a sweep every SWEEP_INTERVAL_S
seconds of writes, so memory stays bounded by the sessions used within a TTL.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from .record import SaveResult, SaveStatus, SessionRecord
from .store import SessionStore

SWEEP_INTERVAL_S = 10.0


class MemoryStore(SessionStore):
    description = "in-process memory (single process, sessions are lost on restart)"

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, tuple[SessionRecord, float]] = {}  # id -> (record, expires_at)
        self._lock = threading.Lock()
        self._last_sweep = clock()
        self.expired_total = 0

    def _live(self, session_id: str, now: float) -> SessionRecord | None:
        entry = self._records.get(session_id)
        if entry is None:
            return None
        record, expires_at = entry
        if expires_at <= now:
            del self._records[session_id]
            self.expired_total += 1
            return None
        return record

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        expired = [key for key, (_, expires_at) in self._records.items() if expires_at <= now]
        for key in expired:
            del self._records[key]
        self.expired_total += len(expired)

    def create(self, record: SessionRecord) -> bool:
        with self._lock:
            now = self._clock()
            self._sweep(now)
            existing = self._live(record.session_id, now)
            if existing is not None:
                return bool(record.reply_tag) and existing.reply_tag == record.reply_tag
            self._records[record.session_id] = (record, now + record.ttl_s)
            return True

    def load_many(self, session_ids: list[str]) -> list[SessionRecord | None]:
        with self._lock:
            now = self._clock()
            results = []
            for session_id in session_ids:
                record = self._live(session_id, now)
                if record is not None:
                    remaining_ms = int((self._records[session_id][1] - now) * 1000)
                    record = dataclasses.replace(record, ttl_remaining_ms=remaining_ms)
                results.append(record)
            return results

    def save_many(self, updates: list[tuple[SessionRecord, int]]) -> list[SaveResult]:
        with self._lock:
            now = self._clock()
            self._sweep(now)
            results = []
            for record, expected_position in updates:
                current = self._live(record.session_id, now)
                if current is None:
                    results.append(SaveResult(SaveStatus.MISSING))
                elif current.position != expected_position:
                    results.append(SaveResult(SaveStatus.CONFLICT, current.position))
                else:
                    self._records[record.session_id] = (record, now + record.ttl_s)
                    results.append(SaveResult(SaveStatus.SAVED, record.position))
            return results

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._live(session_id, self._clock()) is not None and self._records.pop(session_id, None) is not None

    def ping(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._records)
