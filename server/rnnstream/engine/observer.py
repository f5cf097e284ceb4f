"""Hooks through which the engine reports what it does; metrics implement them.

The engine calls these from its scheduler threads and the event loop, so an
implementation must be thread-safe and cheap: it runs on the per-token path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchStats:
    """Timings and sizes of one batched model step."""

    model: str
    architecture: str
    device: str
    size: int  # sessions in the batch
    tokens: int  # input tokens across the batch
    request_tokens: list[int]  # input tokens of each request in the batch
    queue_wait_s: list[float]  # per request: enqueue to start of the batch
    load_s: float  # state load round trip
    compute_s: float  # model step, including the device synchronisation
    store_s: float  # state store round trip
    bytes_read: int  # state bytes loaded
    bytes_written: int  # state bytes stored


class EngineObserver:
    """No-op observer; subclasses override what they record."""

    def batch_done(self, stats: BatchStats) -> None:
        pass

    def queue_depth(self, model: str, architecture: str, device: str, depth: int) -> None:
        pass

    def session_created(self, model: str, architecture: str) -> None:
        pass

    def session_deleted(self, model: str, architecture: str) -> None:
        pass

    def session_expired(self, model: str, architecture: str) -> None:
        """Count a session that a step or read found gone, after this replica had routed it and not deleted it."""

    def generated_token(self, model: str, architecture: str, device: str, seconds: float, first: bool) -> None:
        """Record a streamed token: `seconds` since the request started (first) or since the previous token."""
