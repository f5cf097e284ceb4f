"""Exactly-once steps: expected positions, retried requests and lost replies."""

from __future__ import annotations

import grpc
import pytest
from rnnstream_client import Client, PositionMismatchError
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.RnnStreamStub(channel)
    channel.close()


def test_retried_step_is_applied_once(stub):
    session_id = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lstm", prompt="abc")).session_id
    request = pb.StepRequest(session_id=session_id, text="def", top_k=4, expected_position=3)
    first = stub.Step(request)
    # The reply was "lost": the client sends the very same request again.
    second = stub.Step(request)
    assert first == second
    assert stub.GetSession(pb.GetSessionRequest(session_id=session_id)).position == 6


def test_wrong_position_is_aborted_with_current_position(stub):
    session_id = stub.CreateSession(pb.CreateSessionRequest(model="tiny-gru", prompt="abc")).session_id
    with pytest.raises(grpc.RpcError) as caught:
        stub.Step(pb.StepRequest(session_id=session_id, text="x", expected_position=7))
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert "at position 3, not the expected position 7" in caught.value.details()
    assert ("rnnstream-position", "3") in caught.value.trailing_metadata()
    assert stub.GetSession(pb.GetSessionRequest(session_id=session_id)).position == 3


def test_retry_with_other_tokens_is_not_a_replay(stub):
    session_id = stub.CreateSession(pb.CreateSessionRequest(model="tiny-gru")).session_id
    stub.Step(pb.StepRequest(session_id=session_id, text="ab", expected_position=0))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Step(pb.StepRequest(session_id=session_id, text="xy", expected_position=0))
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert stub.GetSession(pb.GetSessionRequest(session_id=session_id)).position == 2


def test_sdk_tracks_position_and_reports_mismatch(server):
    with Client(server.target) as client:
        mine = client.create_session("tiny-lstm", prompt="abc")
        theirs = client.session(mine.id, position=3)
        theirs.step("d")
        with pytest.raises(PositionMismatchError) as caught:
            mine.step("e")
        assert caught.value.current_position == 4
        assert mine.info().position == 4


def test_replayed_reply_keeps_its_top_k(stub):
    session_id = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lstm")).session_id
    request = pb.StepRequest(session_id=session_id, token_ids=[1, 2, 3], top_k=7, expected_position=0)
    first = stub.Step(request)
    again = stub.Step(request)
    assert len(again.next_tokens) == 7
    assert list(again.input_logprobs) == list(first.input_logprobs)
