"""Fork, reset, export and import of sessions."""

from __future__ import annotations

import pytest
from rnnstream_client import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

from rnnstream.models.bundle import save_bundle
from rnnstream.models.tokenizer import ByteTokenizer

from .conftest import build_tiny_model
from .reference import assert_predictions_close


@pytest.mark.parametrize("model", ["tiny-lstm", "tiny-gru"])
def test_fork_branches_independently(server, model):
    with Client(server.target) as client:
        parent = client.create_session(model, prompt="Branch point: ")
        child = parent.fork(session_id="child-1")
        assert child.id == "child-1"
        assert child.position == parent.position
        assert child.info().model == model
        left = parent.step("left", top_k=5)
        right = child.step("right", top_k=5)
        expected_left = client.create_session(model, prompt="Branch point: left", top_k=5).last
        expected_right = client.create_session(model, prompt="Branch point: right", top_k=5).last
    assert_predictions_close(left.next_tokens, expected_left.next_tokens)
    assert_predictions_close(right.next_tokens, expected_right.next_tokens)


def test_fork_to_existing_id_fails(server):
    with Client(server.target) as client:
        parent = client.create_session("tiny-gru", prompt="abc")
        client.create_session("tiny-gru", session_id="taken")
        with pytest.raises(AlreadyExistsError):
            parent.fork(session_id="taken")
        with pytest.raises(NotFoundError):
            client.session("absent").fork()
        assert client.session("taken").info().position == 0


def test_reset_returns_to_initial_state(server):
    with Client(server.target) as client:
        session = client.create_session("tiny-lstm", prompt="Some context")
        info = session.reset()
        assert info.position == 0
        after_reset = session.step("Hello", top_k=5)
        fresh = client.create_session("tiny-lstm").step("Hello", top_k=5)
    assert after_reset == fresh


@pytest.mark.parametrize("model", ["tiny-lstm", "tiny-gru"])
def test_export_import_continues_identically(server, model):
    with Client(server.target) as client:
        session = client.create_session(model, prompt="Exported text")
        blob = session.export_state()
        imported = client.import_state(blob, session_id="imported-1", ttl_seconds=60)
        assert imported.position == session.position
        assert imported.info().ttl_seconds == 60
        assert imported.step(" goes on", top_k=5) == session.step(" goes on", top_k=5)


def test_corrupted_blob_is_rejected(server):
    with Client(server.target) as client:
        blob = client.create_session("tiny-gru", prompt="abc").export_state()
        damaged = bytearray(blob)
        damaged[40] ^= 0xFF
        with pytest.raises(InvalidArgumentError, match="checksum does not match"):
            client.import_state(bytes(damaged))
        with pytest.raises(InvalidArgumentError, match="too short"):
            client.import_state(b"xyz")
        with pytest.raises(InvalidArgumentError, match="wrong magic"):
            client.import_state(b"JUNK" + blob[4:])


def test_import_into_other_model_fails(server, start_server, redis_url, tmp_path):
    """A blob from tiny-gru cannot be imported where tiny-gru has other weights."""
    with Client(server.target) as client:
        blob = client.create_session("tiny-gru", prompt="abc").export_state()
    other_dir = tmp_path / "other"
    save_bundle(other_dir / "tiny-gru", "tiny-gru", build_tiny_model("gru", seed=99), ByteTokenizer())
    other = start_server(redis_url=redis_url, models_dir=other_dir)
    with Client(other.target) as client:
        with pytest.raises(FailedPreconditionError, match="fingerprint"):
            client.import_state(blob, session_id="wont-exist")
        with pytest.raises(NotFoundError):
            client.session("wont-exist").info()


def reforge(blob: bytes, **header_changes) -> bytes:
    """Rewrite an export's header and recompute its checksum, as a hostile client could."""
    import hashlib
    import json
    import struct

    magic, version, size = struct.unpack_from("<4sHI", blob)
    header = json.loads(blob[10 : 10 + size])
    header.update(header_changes)
    state = blob[10 + size : -16]
    if "state" in header_changes:
        state = header.pop("state")
    encoded = json.dumps(header).encode()
    body = struct.pack("<4sHI", magic, version, len(encoded)) + encoded + state
    return body + hashlib.blake2b(body, digest_size=16).digest()


@pytest.mark.parametrize("changes, phrase", [
    ({"position": -5}, "position -5"),
    ({"position": 2**64}, "position 18446744073709551616"),
    ({"dtype": "float16"}, "dtype 'float16'"),
    ({"position": float("inf")}, "field 'position' is inf, not of type int"),
    ({"position": 1.7}, "field 'position' is 1.7"),
    ({"position": True}, "field 'position' is True"),
    ({"position": "7"}, "field 'position' is '7'"),
    ({"state": b"\xff\xff\xff\x7f" * 96}, "NaN or infinite"),  # tiny-gru: 1 x 2 x 48 floats
])
def test_forged_blob_is_rejected(server, changes, phrase):
    with Client(server.target) as client:
        blob = client.create_session("tiny-gru", prompt="abc").export_state()
        assert client.import_state(reforge(blob), session_id="genuine").position == 3
        with pytest.raises(InvalidArgumentError, match=phrase):
            client.import_state(reforge(blob, **changes), session_id="forged")
        with pytest.raises(NotFoundError):
            client.session("forged").info()


def test_generate_follows_id_reused_for_other_model(start_server, redis_url):
    """Replica B cached the route of an id that replica A re-created for another model."""
    first, second = start_server(redis_url=redis_url), start_server(redis_url=redis_url)
    with Client(first.target) as a, Client(second.target) as b:
        a.create_session("tiny-gru", session_id="reused", prompt="abc")
        b.session("reused").step("d")
        a.session("reused").delete()
        a.create_session("tiny-lstm", session_id="reused", prompt="abc")
        chunks = list(b.session("reused").generate(max_tokens=3, seed=1))
        assert chunks[-1].position == 6
        assert b.session("reused").info().model == "tiny-lstm"
