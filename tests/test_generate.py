"""Generate: streamed sampling that advances the session by exactly the streamed tokens."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
from rnnstream_client import Client, InvalidArgumentError

PROMPT = "Once upon a time"


def generated_ids(chunks) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


def wait_for_position(session, expected: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while True:
        position = session.info().position
        if position == expected or time.monotonic() > deadline:
            return position
        time.sleep(0.05)


@pytest.mark.parametrize("model", ["tiny-lstm", "tiny-gru"])
def test_seeded_generation_is_reproducible(server, model):
    with Client(server.target) as client:
        runs = []
        for _ in range(2):
            session = client.create_session(model, prompt=PROMPT)
            runs.append(list(session.generate(max_tokens=24, seed=7, temperature=0.9, top_k=50, top_p=0.95)))
        other = list(client.create_session(model, prompt=PROMPT).generate(max_tokens=24, seed=8, temperature=0.9))
    assert generated_ids(runs[0]) == generated_ids(runs[1])
    assert generated_ids(runs[0]) != generated_ids(other)
    assert runs[0][-1].finish_reason == "length"
    assert len(generated_ids(runs[0])) == 24


@pytest.mark.parametrize("model", ["tiny-lstm", "tiny-gru"])
def test_session_advances_by_generated_tokens(server, model):
    with Client(server.target) as client:
        session = client.create_session(model, prompt=PROMPT)
        chunks = list(session.generate(max_tokens=16, seed=1))
        tokens = generated_ids(chunks)
        assert session.info().position == len(PROMPT) + 16
        assert chunks[-1].position == len(PROMPT) + 16
        assert [chunk.position for chunk in chunks[:-1]] == list(range(len(PROMPT) + 1, len(PROMPT) + 17))
        continued = session.step(" end", top_k=5)
        replay = client.create_session(model, prompt=list(PROMPT.encode()) + tokens)
        replayed = replay.step(" end", top_k=5)
    assert continued.input_logprobs == pytest.approx(replayed.input_logprobs, abs=1e-5)
    assert [item.token_id for item in continued.next_tokens] == [item.token_id for item in replayed.next_tokens]


def test_generated_logprobs_match_scoring(server):
    with Client(server.target) as client:
        session = client.create_session("tiny-gru", prompt=PROMPT)
        chunks = list(session.generate(max_tokens=10, seed=3))
        scored = client.create_session("tiny-gru", prompt=PROMPT).step(generated_ids(chunks))
    streamed = [value for chunk in chunks for value in chunk.logprobs]
    assert streamed == pytest.approx(scored.input_logprobs, abs=1e-5)


def test_streamed_text_never_splits_characters(server):
    """Random tiny models emit arbitrary bytes, including lead bytes of multi-byte characters."""
    with Client(server.target) as client:
        for seed in range(4):
            session = client.create_session("tiny-lstm", prompt=PROMPT)
            chunks = list(session.generate(max_tokens=60, seed=seed, temperature=1.5))
            data = bytes(generated_ids(chunks))
            text = "".join(chunk.text for chunk in chunks)
            # Decoding each byte alone would turn every multi-byte character into several U+FFFD.
            assert text == data.decode("utf-8", errors="replace")


def test_greedy_stops_after_stop_string(server):
    with Client(server.target) as client:
        full = list(client.create_session("tiny-gru", prompt=PROMPT).generate(max_tokens=40, temperature=0))
        text = "".join(chunk.text for chunk in full)
        stop = text[10:13]
        assert len(stop) == 3
        session = client.create_session("tiny-gru", prompt=PROMPT)
        stopped = list(session.generate(max_tokens=40, temperature=0, stop=[stop]))
        stopped_text = "".join(chunk.text for chunk in stopped)
        assert stopped[-1].finish_reason == "stop"
        assert stopped_text == text[: text.index(stop) + len(stop)]
        assert session.info().position == len(PROMPT) + len(generated_ids(stopped))


def test_cancel_stops_at_sent_tokens(server):
    """After a cancel the session contains a prefix of the generation: what was received plus what was in flight."""
    with Client(server.target) as client:
        session = client.create_session("tiny-lstm", prompt=PROMPT)
        received = []
        stream = session.generate(max_tokens=500, seed=5)
        for chunk in stream:
            received.extend(chunk.token_ids)
            if len(received) == 5:
                break
        stream.close()
        assert session.position is None, "the SDK kept a position that in-flight tokens may have moved"
        time.sleep(0.5)
        kept = session.info().position - len(PROMPT)
        assert 5 <= kept < 500, "generation did not stop at the cancel"
        time.sleep(0.3)
        assert session.info().position - len(PROMPT) == kept, "generation went on after the cancel"
        full = generated_ids(client.create_session("tiny-lstm", prompt=PROMPT).generate(max_tokens=kept, seed=5))
        assert received == full[:5]
        continued = session.step("!", top_k=5)
        replayed = client.create_session("tiny-lstm", prompt=list(PROMPT.encode()) + full).step("!", top_k=5)
    assert continued.input_logprobs == pytest.approx(replayed.input_logprobs, abs=1e-5)


def test_concurrent_generations_equal_lone_ones(start_server, redis_url):
    server = start_server(redis_url=redis_url, max_wait_ms=5.0)

    def run(seed: int) -> list[int]:
        with Client(server.target) as client:
            session = client.create_session("tiny-gru", prompt=PROMPT[: 5 + seed])
            return generated_ids(session.generate(max_tokens=20, seed=seed))

    alone = [run(seed) for seed in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(run, range(6)))
    assert together == alone


@pytest.mark.parametrize("arguments, phrase", [
    ({"max_tokens": 0}, "max_tokens 0 is out of range"),
    ({"max_tokens": 5000}, "max_tokens 5000 is out of range; allowed 1 to 4096"),
    ({"temperature": -1.0}, "temperature -1.0 is out of range"),
    ({"top_p": 0.0}, "top_p 0.0 is out of range"),
    ({"top_k": 257}, "top_k 257 is out of range"),
    ({"stop": [""]}, "stop string ''"),
    ({"prompt": [300]}, "prompt: token id 300"),
])
def test_invalid_generate_leaves_session_unchanged(server, arguments, phrase):
    with Client(server.target) as client:
        session = client.create_session("tiny-gru", prompt=PROMPT)
        with pytest.raises(InvalidArgumentError, match=phrase):
            list(session.generate(**{"max_tokens": 4, **arguments}))
        assert session.info().position == len(PROMPT)
