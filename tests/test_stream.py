"""StreamSession: one reply per streamed input, in order, equal to Step calls."""

from __future__ import annotations

import grpc
import pytest
from rnnstream_client import Client, InvalidArgumentError, RnnstreamError
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

PIECES = ["The ", "quick", " brown", " fox", [32, 106, 117], "mps"]


@pytest.mark.parametrize("model", ["tiny-lstm", "tiny-gru"])
def test_stream_equals_steps(server, model):
    with Client(server.target) as client:
        streamed_session = client.create_session(model)
        with streamed_session.stream() as stream:
            streamed = [stream.step(piece, top_k=4) for piece in PIECES]
        stepped_session = client.create_session(model)
        stepped = [stepped_session.step(piece, top_k=4) for piece in PIECES]
        assert streamed == stepped
        assert streamed_session.info().position == sum(len(piece) for piece in PIECES)


def test_stream_rejects_other_session(server):
    with Client(server.target) as client:
        first = client.create_session("tiny-gru")
        second = client.create_session("tiny-gru")
        stub = pb_grpc.RnnStreamStub(client._channel)
        requests = [pb.StepRequest(session_id=first.id, text="a"), pb.StepRequest(session_id=second.id, text="b")]
        replies = stub.StreamSession(iter(requests), timeout=10)
        assert next(replies).position == 1
        with pytest.raises(grpc.RpcError) as caught:
            next(replies)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "open one stream per session" in caught.value.details()
        assert second.info().position == 0


def test_stream_error_keeps_earlier_steps(server):
    with Client(server.target) as client:
        session = client.create_session("tiny-lstm")
        with session.stream() as stream:
            stream.step("ab")
            with pytest.raises(InvalidArgumentError, match="token id 999"):
                stream.step([999])
        assert session.info().position == 2


def test_stream_step_after_error_says_closed(server):
    with Client(server.target) as client:
        session = client.create_session("tiny-lstm")
        with session.stream() as stream:
            with pytest.raises(InvalidArgumentError, match="text is empty"):
                stream.step("")
            with pytest.raises(RnnstreamError, match="this stream already ended with INVALID_ARGUMENT"):
                stream.step("abc")
        assert session.info().position == 0
