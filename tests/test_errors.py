"""Bad input gets a precise status and message, and never changes the session or stops the server."""

from __future__ import annotations

import time

import grpc
import pytest
from rnnstream_client import (
    AlreadyExistsError,
    Client,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

from .conftest import free_port


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.RnnStreamStub(channel)
    channel.close()


def call_error(method, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=10)
    return caught.value


INVALID_STEPS = [
    ("token id outside vocabulary", {"token_ids": [72, 256]}, ["token id 256", "index 1", "0 to 255"]),
    ("empty text", {"text": ""}, ["text is empty"]),
    ("neither ids nor text", {}, ["missing", "token ids or text"]),
    ("both ids and text", {"token_ids": [72], "text": "H"}, ["not both"]),
    ("input over the maximum", {"text": "x" * 65}, ["65 tokens", "maximum of 64"]),
    ("top_k over vocabulary", {"text": "a", "top_k": 257}, ["top_k 257", "0 to 256"]),
]


@pytest.mark.parametrize("label, fields, phrases", INVALID_STEPS, ids=[case[0] for case in INVALID_STEPS])
def test_invalid_step_leaves_session_unchanged(start_server, redis_url, label, fields, phrases):
    server = start_server(redis_url=redis_url, max_input_tokens=64)
    with Client(server.target) as client:
        session = client.create_session("tiny-lstm", prompt="Hello")
        before = session.info()
        stub = pb_grpc.RnnStreamStub(client._channel)
        error = call_error(stub.Step, pb.StepRequest(session_id=session.id, **fields))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        for phrase in phrases:
            assert phrase in error.details(), error.details()
        after = session.info()
        assert after.position == before.position
        assert after.updated_at == before.updated_at
        # The session continues exactly as a fresh one given the same text.
        continued = session.step(" world", top_k=3)
        fresh = client.create_session("tiny-lstm", prompt="Hello world", top_k=3)
        assert continued.next_tokens == fresh.last.next_tokens


def test_unknown_model_is_not_found(stub):
    error = call_error(stub.CreateSession, pb.CreateSessionRequest(model="no-such-model"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in error.details()
    assert "tiny-gru, tiny-lstm" in error.details()


@pytest.mark.parametrize("method, request_type", [
    ("Step", lambda: pb.StepRequest(session_id="missing-session", text="a")),
    ("GetSession", lambda: pb.GetSessionRequest(session_id="missing-session")),
    ("DeleteSession", lambda: pb.DeleteSessionRequest(session_id="missing-session")),
])
def test_unknown_session_is_not_found(stub, method, request_type):
    error = call_error(getattr(stub, method), request_type())
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "missing-session" in error.details()


def test_invalid_session_id_is_rejected(stub):
    error = call_error(stub.CreateSession, pb.CreateSessionRequest(model="tiny-gru", session_id="has space"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'has space'" in error.details()


def test_ttl_over_maximum_is_rejected(start_server, redis_url):
    server = start_server(redis_url=redis_url, max_ttl=100, default_ttl=50)
    with Client(server.target) as client:
        with pytest.raises(InvalidArgumentError, match="ttl_seconds 101 exceeds the maximum of 100"):
            client.create_session("tiny-gru", ttl_seconds=101)


def test_invalid_prompt_creates_no_session(server):
    with Client(server.target) as client:
        with pytest.raises(InvalidArgumentError, match="prompt: token id 300"):
            client.create_session("tiny-gru", session_id="never-made", prompt=[1, 300])
        with pytest.raises(NotFoundError):
            client.session("never-made").info()


def test_duplicate_session_id_is_already_exists(server):
    with Client(server.target) as client:
        first = client.create_session("tiny-gru", session_id="chosen-id", prompt="abc")
        with pytest.raises(AlreadyExistsError, match="chosen-id"):
            client.create_session("tiny-lstm", session_id="chosen-id")
        with pytest.raises(AlreadyExistsError):
            client.create_session("tiny-gru", session_id="chosen-id", prompt="other prompt")
        assert first.info().position == 3
        assert first.info().model == "tiny-gru"


def test_deleted_session_is_not_found(server):
    with Client(server.target) as client:
        session = client.create_session("tiny-gru", prompt="abc")
        session.delete()
        with pytest.raises(NotFoundError):
            session.step("d")
        with pytest.raises(NotFoundError):
            session.delete()


def test_server_keeps_serving_after_errors(server):
    with Client(server.target) as client:
        for _ in range(20):
            with pytest.raises(InvalidArgumentError):
                client.create_session("tiny-gru", prompt=[999])
        assert client.create_session("tiny-gru", prompt="ok").position == 2


def test_redis_unreachable_is_unavailable(start_server):
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    server = start_server(redis_url=dead_url, redis_timeout=0.5)
    with Client(server.target) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="(?i)redis at 127.0.0.1"):
            client.create_session("tiny-gru")
        with pytest.raises(UnavailableError, match="(?i)redis at 127.0.0.1"):
            client.session("some-session", position=0).step("a", retries=0)
        assert time.monotonic() - started < 10, "UNAVAILABLE took longer than the Redis timeout allows"
        assert [model.name for model in client.list_models()] == ["tiny-gru", "tiny-lstm"]


def test_session_of_other_fingerprint_is_rejected(server, redis_url):
    """A state written by one model is never read into another, even under the same model name."""
    import redis as redis_client

    with Client(server.target) as client:
        session = client.create_session("tiny-gru", prompt="abc")
        fingerprint = session.info().fingerprint
        key = f"rnnstream:session:{{{session.id}}}"
        connection = redis_client.Redis.from_url(redis_url)
        connection.hset(key, "fingerprint", "0" * 32)
        with pytest.raises(Exception) as caught:
            session.step("d")
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "fingerprint" in caught.value.details
        connection.hset(key, mapping={"fingerprint": fingerprint, "shape": "1,2,7"})
        with pytest.raises(Exception) as caught:
            session.step("d")
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "shape (1, 2, 7)" in caught.value.details
        connection.hset(key, "shape", "1,2,48")
        assert session.step("d").position == 4
        connection.close()
