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

The store works against one server, a Redis Cluster or a Sentinel-managed
master; rnnstream.state.redis_connect lists the URL forms.
"""

from __future__ import annotations

import hashlib
import logging
import threading

import redis
from redis.exceptions import NoScriptError

from ..errors import StoreUnavailable
from .record import SaveResult, SaveStatus, SessionRecord
from .redis_connect import connect, parse_redis_url
from .store import SessionStore

logger = logging.getLogger(__name__)

KEY_PREFIX = "rnnstream:session:"
HEALTH_KEY = "rnnstream:health"  # written by every health check
HEALTH_KEY_TTL_MS = 10_000

# ARGV: ttl seconds, then field/value pairs to write. A session that exists with the
# same reply_tag is this very create re-sent after a timeout, so it reports success.
CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local tag = nil
  for i = 2, #ARGV, 2 do
    if ARGV[i] == 'reply_tag' then tag = ARGV[i + 1] end
  end
  if tag and tag ~= '' and redis.call('HGET', KEYS[1], 'reply_tag') == tag then return 1 end
  return 0
end
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

REDIS_ERRORS = (
    redis.exceptions.ConnectionError,  # includes Sentinel's MasterNotFoundError
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,  # CLUSTERDOWN and retries exhausted while the cluster changes
    redis.exceptions.RedisClusterException,  # no startup node reachable, or a slot without a node
    redis.exceptions.OutOfMemoryError,  # used memory above maxmemory with the noeviction policy
    redis.exceptions.ReadOnlyError,  # connected to a replica, for example after a failover
)


class LuaScript:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


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
        self.target = parse_redis_url(url)
        self.description = self.target.description
        self._client = None
        self._client_lock = threading.Lock()
        self._create = LuaScript(CREATE_SCRIPT)
        self._save = LuaScript(SAVE_SCRIPT)

    @property
    def client(self):
        """The redis-py client, made on first use because a cluster client connects to learn the slots."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = connect(self.target, self.timeout_s)
        return self._client

    def _unavailable(self, error: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"{self.description} is unavailable: {error}")

    def _run_script(self, script: LuaScript, calls: list[tuple[str, list]]) -> list:
        """Run a script once per (key, args) call in one pipeline; load it where Redis reports NOSCRIPT.

        A new, restarted or failed-over node has an empty script cache, and redis-py's
        cluster pipelines do not load scripts themselves. NOSCRIPT means the script
        did not run, so running those calls again is safe.
        """
        replies = self._evalsha_pipeline(script, calls)
        missing = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            logger.debug(
                "loading a Lua script into %s after %d NOSCRIPT replies", self.description, len(missing)
            )
            self.client.script_load(script.source)  # on every primary of a cluster
            retried = self._evalsha_pipeline(script, [calls[index] for index in missing])
            for index, reply in zip(missing, retried):
                replies[index] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _evalsha_pipeline(self, script: LuaScript, calls: list[tuple[str, list]]) -> list:
        pipe = self.client.pipeline(transaction=False)
        for key, args in calls:
            pipe.evalsha(script.sha, 1, key, *args)
        return pipe.execute(raise_on_error=False)

    def create(self, record: SessionRecord) -> bool:
        call = (session_key(record.session_id), [record.ttl_s, *_fields(record)])
        try:
            return bool(self._run_script(self._create, [call])[0])
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
        calls = [
            (session_key(record.session_id), [str(expected_position), record.ttl_s, *_fields(record)])
            for record, expected_position in updates
        ]
        try:
            replies = self._run_script(self._save, calls)
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
        # A write, not PING: a replica replies to PING but rejects every session write.
        try:
            self.client.set(HEALTH_KEY, "1", px=HEALTH_KEY_TTL_MS)
        except REDIS_ERRORS as error:
            raise self._unavailable(error) from error

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
