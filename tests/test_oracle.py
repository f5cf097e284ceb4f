"""Chunked steps through a real server and Redis equal one call and the offline forward pass."""

from __future__ import annotations

import concurrent.futures

import pytest
from rnnstream_client import Client

from rnnstream.models.bundle import load_bundle

from .reference import reference_logprobs

TEXT = (
    "In the beginning God created the heaven and the earth. "
    "A fool and his money are soon parted; "
    "naïve café owners say “déjà vu” — 10% off!"
)
TOLERANCE = 1e-5


def chunks_of(tokens: list[int], size: int) -> list[list[int]]:
    return [tokens[start : start + size] for start in range(0, len(tokens), size)]


def irregular_chunks(tokens: list[int]) -> list[list[int]]:
    sizes, pieces, start = [1, 3, 17, 2, 40, 5], [], 0
    index = 0
    while start < len(tokens):
        size = sizes[index % len(sizes)]
        pieces.append(tokens[start : start + size])
        start += size
        index += 1
    return pieces


def assert_close(actual: list[float], expected: list[float], what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} values, expected {len(expected)}"
    worst = max((abs(a - b) for a, b in zip(actual, expected)), default=0.0)
    assert worst <= TOLERANCE, f"{what}: largest difference {worst:.2e} exceeds {TOLERANCE}"


def run_chunks(client: Client, model: str, pieces: list[list[int]], top_k: int):
    session = client.create_session(model)
    input_logprobs: list[float] = []
    for piece in pieces:
        result = session.step(piece, top_k=top_k)
        input_logprobs += result.input_logprobs
    assert result.position == sum(len(piece) for piece in pieces)
    return input_logprobs, result.next_tokens


@pytest.mark.parametrize("architecture", ["lstm", "gru"])
def test_chunked_steps_match_offline_pass(server, tiny_models_dir, architecture):
    model_name = f"tiny-{architecture}"
    bundle = load_bundle(tiny_models_dir / model_name)
    tokens = bundle.tokenizer.encode(TEXT)
    expected_inputs, expected_next = reference_logprobs(bundle.model, tokens)
    expected_top = expected_next.topk(10)

    chunkings = {
        "one call": [tokens],
        "one token per call": chunks_of(tokens, 1),
        "chunks of 7": chunks_of(tokens, 7),
        "chunks of 64": chunks_of(tokens, 64),
        "irregular chunks": irregular_chunks(tokens),
    }
    with Client(server.target, timeout=30) as client:
        for label, pieces in chunkings.items():
            input_logprobs, next_tokens = run_chunks(client, model_name, pieces, top_k=10)
            assert_close(input_logprobs, expected_inputs, f"{architecture} {label} input log-probs")
            assert [item.token_id for item in next_tokens] == expected_top.indices.tolist(), label
            assert_close([item.logprob for item in next_tokens], expected_top.values.tolist(), f"{label} top-k")


@pytest.mark.parametrize("architecture", ["lstm", "gru"])
def test_text_input_matches_token_ids(server, architecture):
    with Client(server.target) as client:
        by_text = client.create_session(f"tiny-{architecture}").step(TEXT, top_k=5)
        by_ids = client.create_session(f"tiny-{architecture}").step(list(TEXT.encode()), top_k=5)
    assert by_text.input_token_ids == list(TEXT.encode())
    assert by_text.input_logprobs == by_ids.input_logprobs
    assert by_text.next_tokens == by_ids.next_tokens


@pytest.mark.parametrize("architecture", ["lstm", "gru"])
def test_prompt_equals_first_step(server, architecture):
    with Client(server.target) as client:
        prompted = client.create_session(f"tiny-{architecture}", prompt=TEXT, top_k=5)
        stepped = client.create_session(f"tiny-{architecture}")
        result = stepped.step(TEXT, top_k=5)
    assert prompted.position == result.position
    assert prompted.last.input_logprobs == result.input_logprobs
    assert prompted.last.next_tokens == result.next_tokens


@pytest.mark.parametrize("architecture", ["lstm", "gru"])
def test_concurrent_mixed_lengths_match_offline(start_server, redis_url, tiny_models_dir, architecture):
    """Sessions stepped at once with different input lengths batch together and still match the reference."""
    server = start_server(redis_url=redis_url, max_wait_ms=20.0)
    model_name = f"tiny-{architecture}"
    bundle = load_bundle(tiny_models_dir / model_name)
    texts = [TEXT[: 20 + 9 * index] for index in range(12)]
    chunk_sizes = [1, 2, 3, 5, 8, 13]

    def run(index: int):
        tokens = bundle.tokenizer.encode(texts[index])
        with Client(server.target, timeout=60) as client:
            return tokens, run_chunks(client, model_name, chunks_of(tokens, chunk_sizes[index % 6]), top_k=3)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, range(12)))
    for tokens, (input_logprobs, next_tokens) in results:
        expected_inputs, expected_next = reference_logprobs(bundle.model, tokens)
        assert_close(input_logprobs, expected_inputs, f"{len(tokens)} tokens input log-probs")
        assert_close([item.logprob for item in next_tokens], expected_next.topk(3).values.tolist(), "top-k")


@pytest.mark.parametrize("architecture", ["lstm", "gru"])
def test_long_inputs_run_in_chunks_exactly(start_server, redis_url, tiny_models_dir, architecture):
    """Inputs longer than max_chunk_tokens run over several batches, interleaved with other steps."""
    server = start_server(redis_url=redis_url, max_chunk_tokens=16, max_wait_ms=5.0)
    model_name = f"tiny-{architecture}"
    bundle = load_bundle(tiny_models_dir / model_name)
    long_tokens = bundle.tokenizer.encode(TEXT * 3)
    short_texts = [TEXT[index : index + 10] for index in range(0, 60, 10)]

    def run_long():
        with Client(server.target, timeout=60) as client:
            session = client.create_session(model_name, prompt=long_tokens[:50], top_k=5)
            result = session.step(long_tokens[50:], top_k=5)
            return session.last.input_logprobs, result

    def run_short(text):
        with Client(server.target, timeout=60) as client:
            return client.create_session(model_name).step(text, top_k=3)

    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        long_future = pool.submit(run_long)
        short_results = list(pool.map(run_short, short_texts))
        prompt_logprobs, result = long_future.result()
    expected_inputs, expected_next = reference_logprobs(bundle.model, long_tokens)
    assert result.position == len(long_tokens)
    assert_close(result.input_logprobs, expected_inputs[50:], "long input log-probs")
    assert_close([item.logprob for item in result.next_tokens], expected_next.topk(5).values.tolist(), "top-k")
    for text, short in zip(short_texts, short_results):
        expected_short, _ = reference_logprobs(bundle.model, bundle.tokenizer.encode(text))
        assert_close(short.input_logprobs, expected_short, f"short step {text!r}")
