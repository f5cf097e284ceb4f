"""Session stores: Redis (real redis-server) and in-process memory, through the same contract."""

from __future__ import annotations

import pytest
import redis
import torch

from rnnstream.errors import StoreUnavailable
from rnnstream.state.codec import split_states, stack_states, state_nbytes
from rnnstream.state.memory import MemoryStore
from rnnstream.state.record import SaveStatus, SessionRecord
from rnnstream.state.redis_store import RedisStore, session_key

from .conftest import RedisProcess


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_record(session_id: str = "s1", position: int = 0, ttl_s: int = 60) -> SessionRecord:
    shape = (2, 2, 4)
    return SessionRecord(
        session_id=session_id,
        model="m",
        fingerprint="f" * 32,
        position=position,
        created_ms=1,
        updated_ms=1,
        ttl_s=ttl_s,
        shape=shape,
        state=bytes(state_nbytes(shape)),
    )


@pytest.fixture(params=["redis", "memory"])
def store(request, redis_url):
    if request.param == "redis":
        store = RedisStore(redis_url, timeout_s=1.0)
    else:
        store = MemoryStore()
    yield store
    store.close()


def test_create_then_load_round_trips(store):
    record = make_record()
    assert store.create(record)
    loaded = store.load("s1")
    assert loaded.state == record.state
    assert loaded.shape == (2, 2, 4)
    assert loaded.position == 0
    assert loaded.model == "m"
    assert 0 < loaded.ttl_remaining_ms <= 60_000


def test_create_refuses_existing_id(store):
    assert store.create(make_record())
    assert not store.create(make_record(position=5))
    assert store.load("s1").position == 0


def test_save_is_compare_and_set(store):
    store.create(make_record())
    advanced = make_record(position=3)
    assert store.save(advanced, expected_position=0).status is SaveStatus.SAVED
    stale = store.save(make_record(position=4), expected_position=0)
    assert stale.status is SaveStatus.CONFLICT
    assert stale.current_position == 3
    assert store.load("s1").position == 3


def test_save_of_missing_session_is_missing(store):
    assert store.save(make_record(position=1), expected_position=0).status is SaveStatus.MISSING
    assert store.load("s1") is None


def test_save_many_is_independent_per_session(store):
    store.create(make_record("a"))
    store.create(make_record("b"))
    results = store.save_many([(make_record("a", 1), 0), (make_record("b", 1), 7), (make_record("c", 1), 0)])
    assert [result.status for result in results] == [SaveStatus.SAVED, SaveStatus.CONFLICT, SaveStatus.MISSING]


def test_delete(store):
    store.create(make_record())
    assert store.delete("s1")
    assert not store.delete("s1")
    assert store.load("s1") is None


def test_redis_ttl_is_refreshed_by_save(redis_url):
    store = RedisStore(redis_url)
    client = redis.Redis.from_url(redis_url)
    store.create(make_record(ttl_s=100))
    client.expire(session_key("s1"), 5)
    store.save(make_record(position=1, ttl_s=100), expected_position=0)
    assert client.ttl(session_key("s1")) > 90
    client.close()
    store.close()


def test_memory_store_expires_sessions():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    store.create(make_record("old", ttl_s=10))
    clock.now += 5
    store.create(make_record("young", ttl_s=10))
    clock.now += 6
    assert store.load("old") is None
    assert store.load("young") is not None
    assert store.save(make_record("young", 1, ttl_s=10), 0).status is SaveStatus.SAVED
    clock.now += 9
    assert store.load("young") is not None


def test_memory_store_sweep_bounds_memory():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for index in range(100):
        store.create(make_record(f"s{index}", ttl_s=1))
    clock.now += 60
    store.create(make_record("fresh", ttl_s=100))
    assert len(store) == 1
    assert store.expired_total == 100


def test_codec_round_trip_and_layout():
    shape = (2, 3, 5)  # (S, L, H)
    states = [torch.randn(shape) for _ in range(4)]
    blobs = [state.numpy().tobytes() for state in states]
    stacked = stack_states(blobs, shape, torch.device("cpu"))
    assert len(stacked) == 2
    assert stacked[0].shape == (3, 4, 5)  # (L, B, H)
    assert torch.equal(stacked[1][:, 2], states[2][1])
    assert split_states(stacked) == blobs


def test_redis_out_of_memory_is_unavailable(tmp_path):
    process = RedisProcess(tmp_path / "full-redis").start()
    client = redis.Redis.from_url(process.url)
    store = RedisStore(process.url)
    try:
        assert store.create(make_record("s1"))
        client.config_set("maxmemory", 1)  # every write now exceeds maxmemory (policy noeviction)
        with pytest.raises(StoreUnavailable, match="maxmemory"):
            store.save(make_record("s1", position=1), expected_position=0)
        with pytest.raises(StoreUnavailable, match="maxmemory"):
            store.create(make_record("s2"))
        assert store.load("s1").position == 0
    finally:
        store.close()
        client.close()
        process.stop()


def test_create_resent_after_timeout_succeeds(store):
    """The same create sent twice (its first reply lost) is one insert, not a conflict."""
    tagged = make_record()
    tagged = type(tagged)(**{**tagged.__dict__, "reply_tag": "create:abc"})
    assert store.create(tagged)
    assert store.create(tagged)
    other = type(tagged)(**{**tagged.__dict__, "reply_tag": "create:xyz"})
    assert not store.create(other)
    untagged = make_record()
    assert not store.create(untagged)
