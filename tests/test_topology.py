"""The compose topology without Docker: redis-server, two `rnnstream serve` replicas and nginx, on loopback.

nginx runs the compose nginx.conf with the replica addresses rewritten for
loopback, so calls are balanced the way they are in a compose deployment.
"""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rnnstream_client import Client
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

from rnnstream.models.bundle import load_bundle

from .cli_helpers import ServeProcess
from .conftest import free_port
from .deploy_helpers import NginxProcess, served_by_pid
from .reference import reference_logprobs
from .test_oracle import TEXT, assert_close, chunks_of

MODEL = "tiny-lstm"
TOP_K = 10


@pytest.fixture
def replicas(tiny_models_dir, redis_url):
    started = []
    try:
        for _ in range(2):
            started.append(
                ServeProcess(
                    "--models-dir", str(tiny_models_dir), "--redis-url", redis_url,
                    "--metrics-port", str(free_port()),
                )
            )
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture
def nginx(tmp_path, replicas):
    process = NginxProcess(tmp_path / "nginx", [replica.target for replica in replicas], free_port())
    yield process
    process.stop()


def metrics_port_of(replica: ServeProcess) -> int:
    assert replica.wait_for_log("Prometheus metrics on http://"), replica.log
    line = next(line for line in replica.lines if "Prometheus metrics on http://" in line)
    return int(line.rsplit(":", 1)[1].split("/", 1)[0])


def step_requests_served(metrics_port: int) -> float:
    """rnnstream_requests_total for Step with status OK, scraped from a replica's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rnnstream_requests_total" and sample.labels.get("rpc") == "Step":
                if sample.labels.get("code") == "OK":
                    total += sample.value
    return total


def test_session_moves_between_replicas_and_survives_one(tiny_models_dir, replicas, nginx):
    bundle = load_bundle(tiny_models_dir / MODEL)
    tokens = bundle.tokenizer.encode(TEXT)
    expected_inputs, expected_next = reference_logprobs(bundle.model, tokens)
    expected_top = expected_next.topk(TOP_K)
    pieces = chunks_of(tokens, 9)
    pids = {replica.process.pid for replica in replicas}

    # Through nginx: create the session on one replica and step until the other replica serves a step.
    input_logprobs: list[float] = []
    served = []
    with grpc.insecure_channel(nginx.target) as channel:
        stub = pb_grpc.RnnStreamStub(channel)
        reply, call = stub.CreateSession.with_call(
            pb.CreateSessionRequest(model=MODEL, prompt_token_ids=pieces[0], top_k=TOP_K), timeout=30
        )
        session_id, position = reply.session_id, reply.position
        input_logprobs += reply.input_logprobs
        creator = served_by_pid(call)
        served.append(creator)
        next_piece = 1
        while next_piece < 6:
            reply, call = stub.Step.with_call(
                pb.StepRequest(
                    session_id=session_id,
                    token_ids=pieces[next_piece],
                    top_k=TOP_K,
                    expected_position=position,
                ),
                timeout=30,
            )
            position = reply.position
            input_logprobs += reply.input_logprobs
            served.append(served_by_pid(call))
            next_piece += 1
    assert creator in pids
    assert set(served) == pids, f"calls through nginx were served by {served}, replicas are {pids}"

    # Both replicas served steps, and both metrics endpoints report them.
    for replica in replicas:
        assert step_requests_served(metrics_port_of(replica)) > 0, replica.log

    # Kill the replica that created the session; the session continues on the other one.
    creator_replica = next(replica for replica in replicas if replica.process.pid == creator)
    survivor = next(replica for replica in replicas if replica.process.pid != creator)
    creator_replica.stop()
    log_lines_before = len(nginx.access_log_lines())
    with Client(nginx.target, timeout=30) as client:
        session = client.session(session_id, position=position)
        for piece in pieces[next_piece:]:
            result = session.step(piece, top_k=TOP_K)
            input_logprobs += result.input_logprobs
    assert result.position == len(tokens)

    assert_close(input_logprobs, expected_inputs, "input log-probs through nginx")
    assert [item.token_id for item in result.next_tokens] == expected_top.indices.tolist()
    top_logprobs = [item.logprob for item in result.next_tokens]
    assert_close(top_logprobs, expected_top.values.tolist(), "top-k log-probs")

    # Every call after the kill ended on the survivor, whichever replica nginx tried first.
    after_kill = [line for line in nginx.access_log_lines()[log_lines_before:] if "/Step " in line]
    assert len(after_kill) >= len(pieces) - next_piece
    for line in after_kill:
        upstreams = line.split("upstream=", 1)[1].split(" grpc_status=", 1)[0]
        assert upstreams.rstrip(",").split(", ")[-1] == survivor.target, line


def test_replicas_balance_new_sessions(replicas, nginx):
    """Round robin spreads calls on one connection over both replicas."""
    with grpc.insecure_channel(nginx.target) as channel:
        stub = pb_grpc.RnnStreamStub(channel)
        pids = set()
        for _ in range(6):
            _, call = stub.CreateSession.with_call(pb.CreateSessionRequest(model=MODEL), timeout=30)
            pids.add(served_by_pid(call))
    assert pids == {replica.process.pid for replica in replicas}
