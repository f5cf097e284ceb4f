"""Checks that sessions hold exactly the acknowledged tokens, against the offline reference."""

from __future__ import annotations

from dataclasses import dataclass

from rnnstream.models.network import RecurrentLM

from .reference import reference_logprobs

TOLERANCE = 1e-5


@dataclass
class Acknowledged:
    """One step reply: the tokens it applied and what the server returned for them."""

    tokens: list[int]
    position: int  # session position after the step
    input_logprobs: list[float]


def serial_order(replies: list[Acknowledged], start: int = 0) -> list[Acknowledged]:
    """Order replies by position and check they chain with no gap or overlap; return them in order."""
    ordered = sorted(replies, key=lambda reply: reply.position)
    position = start
    for reply in ordered:
        assert reply.position - len(reply.tokens) == position, (
            f"reply ending at {reply.position} with {len(reply.tokens)} tokens does not follow position {position}: "
            "a step was lost, doubled or applied out of order"
        )
        position = reply.position
    return ordered


def check_replies(model: RecurrentLM, prefix: list[int], replies: list[Acknowledged]) -> list[int]:
    """Check every reply's log-probs against the offline pass over prefix + all tokens; return all tokens."""
    ordered = serial_order(replies, start=len(prefix))
    tokens = prefix + [token for reply in ordered for token in reply.tokens]
    expected, _ = reference_logprobs(model, tokens)
    for reply in ordered:
        start = reply.position - len(reply.tokens)
        for offset, value in enumerate(reply.input_logprobs):
            difference = abs(value - expected[start + offset])
            assert difference <= TOLERANCE, f"log-prob at position {start + offset} differs by {difference:.2e}"
    return tokens


def check_state(client, session_id: str, model: RecurrentLM, tokens: list[int]) -> None:
    """Check the stored session is at len(tokens) and continues exactly like the offline pass over tokens."""
    session = client.session(session_id)
    assert session.info().position == len(tokens)
    probe = [33, 10]
    result = session.step(probe, top_k=3)
    expected, expected_next = reference_logprobs(model, tokens + probe)
    for got, want in zip(result.input_logprobs, expected[len(tokens) :]):
        assert abs(got - want) <= TOLERANCE
    assert [item.token_id for item in result.next_tokens] == expected_next.topk(3).indices.tolist()
