"""The Redis session store.

Each session is one hash at `rnnstream:session:{<id>}`; the braces are a Redis
Cluster hash tag, so every key of a session maps to one slot. Fields:

  model, fingerprint    the model the state belongs to
  position              tokens consumed (decimal)
  created_ms, updated_ms  Unix milliseconds
  ttl_s                 idle TTL in seconds; the key's EXPIRE is reset to it on every write
  dtype, shape          "float32" and "S,L,H" of the packed state
  state                 packed state bytes (see rnnstream.state.codec)
  reply_tag, reply      tag and encoded reply of the last applied step

Writes are compare-and-set on `position` in a Lua script, so two replicas that
step one session at once can never both apply their step.
"""

from __future__ import annotations

import logging

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..errors import StoreUnavailable
from .record import SaveResult, SaveStatus, SessionRecord
from .store import SessionStore

logger = logging.getLogger(__name__)

KEY_PREFIX = "rnnstream:session:"

CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# ARGV: expected position, ttl seconds, then field/value pairs to write.
SAVE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'position')
if not current then return {-1, 0} end
if current ~= ARGV[1] then return {0, tonumber(current)} end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {1, 0}
"""

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def session_key(session_id: str) -> str:
    return f"{KEY_PREFIX}{{{session_id}}}"


def _fields(record: SessionRecord) -> list:
    return [
        "model", record.model,
        "fingerprint", record.fingerprint,
        "position", str(record.position),
        "created_ms", str(record.created_ms),
        "updated_ms", str(record.updated_ms),
        "ttl_s", str(record.ttl_s),
        "dtype", record.dtype,
        "shape", ",".join(str(size) for size in record.shape),
        "state", record.state,
        "reply_tag", record.reply_tag,
        "reply", record.reply,
    ]


def _record(session_id: str, fields: dict[bytes, bytes], pttl: int) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        model=fields[b"model"].decode(),
        fingerprint=fields[b"fingerprint"].decode(),
        position=int(fields[b"position"]),
        created_ms=int(fields[b"created_ms"]),
        updated_ms=int(fields[b"updated_ms"]),
        ttl_s=int(fields[b"ttl_s"]),
        dtype=fields[b"dtype"].decode(),
        shape=tuple(int(size) for size in fields[b"shape"].split(b",")),
        state=fields[b"state"],
        reply_tag=fields.get(b"reply_tag", b"").decode(),
        reply=fields.get(b"reply", b""),
        ttl_remaining_ms=pttl,
    )


class RedisStore(SessionStore):
    def __init__(self, url: str, timeout_s: float = 1.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
            health_check_interval=10,
        )
        self._create = self.client.register_script(CREATE_SCRIPT)
        self._save = self.client.register_script(SAVE_SCRIPT)
        pool = self.client.connection_pool.connection_kwargs
        self.description = f"redis at {pool.get('host', pool.get('path', '?'))}:{pool.get('port', '')}/{pool.get('db', 0)}"

    def _unavailable(self, error: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"Redis at {self.description} is unavailable: {error}")

    def create(self, record: SessionRecord) -> bool:
        try:
            return bool(self._create(keys=[session_key(record.session_id)], args=[record.ttl_s, *_fields(record)]))
        except REDIS_ERRORS as error:
            raise self._unavailable(error) from error

    def load_many(self, session_ids: list[str]) -> list[SessionRecord | None]:
        try:
            pipe = self.client.pipeline(transaction=False)
            for session_id in session_ids:
                key = session_key(session_id)
                pipe.hgetall(key)
                pipe.pttl(key)
            replies = pipe.execute()
        except REDIS_ERRORS as error:
            raise self._unavailable(error) from error
        records: list[SessionRecord | None] = []
        for index, session_id in enumerate(session_ids):
            fields, pttl = replies[2 * index], replies[2 * index + 1]
            records.append(_record(session_id, fields, pttl) if fields else None)
        return records

    def save_many(self, updates: list[tuple[SessionRecord, int]]) -> list[SaveResult]:
        try:
            pipe = self.client.pipeline(transaction=False)
            for record, expected_position in updates:
                self._save(
                    keys=[session_key(record.session_id)],
                    args=[str(expected_position), record.ttl_s, *_fields(record)],
                    client=pipe,
                )
            replies = pipe.execute()
        except REDIS_ERRORS as error:
            raise self._unavailable(error) from error
        results = []
        for status, current in replies:
            if status == 1:
                results.append(SaveResult(SaveStatus.SAVED))
            elif status == 0:
                results.append(SaveResult(SaveStatus.CONFLICT, int(current)))
            else:
                results.append(SaveResult(SaveStatus.MISSING))
        return results

    def delete(self, session_id: str) -> bool:
        try:
            return bool(self.client.delete(session_key(session_id)))
        except REDIS_ERRORS as error:
            raise self._unavailable(error) from error

    def ping(self) -> None:
        try:
            self.client.ping()
        except REDIS_ERRORS as error:
            raise self._unavailable(error) from error

    def close(self) -> None:
        self.client.close()
