"""Per-model step scheduler: gathers steps of different sessions into one forward pass.

One thread per model repeats these steps:
1. Take up to max_batch queued steps, at most one per session, so the steps of
   one session apply in arrival order.
2. Load their states in one pipelined store round trip.
3. Run one batched model step. An input longer than max_chunk_tokens runs one
   chunk per batch, keeping its partial state here until its last chunk.
4. Write the new states back in one round trip, with a compare-and-set on each
   session's position, and resolve each step's future.
A step whose write loses a race with another replica is queued again and runs
from the newly stored state.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import random
import struct
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PositionMismatch,
    RnnstreamError,
    StoreUnavailable,
    WrongModel,
)
from ..state.record import SaveStatus, SessionRecord
from ..state.store import SessionStore, now_ms
from .observer import BatchStats, EngineObserver
from .runner import ModelRunner

logger = logging.getLogger(__name__)

MAX_CONFLICT_RETRIES = 32
CONFLICT_BACKOFF_S = 0.0005  # first retry waits up to this long, doubling per retry
CONFLICT_BACKOFF_CAP_S = 0.05


@dataclass
class StepWork:
    """One queued step of one session."""

    session_id: str
    tokens: list[int]
    future: concurrent.futures.Future
    expected_position: int | None = None
    reply_tag: str = ""  # identifies the step in the stored record, so a re-sent step is never applied twice
    new_record: SessionRecord | None = None  # set when the step creates the session (a prompt)
    conflicts: int = 0
    # Progress of an input longer than the scheduler's chunk, run over several batches:
    # tokens[:offset] are done, from base_record's state, giving partial_state.
    offset: int = 0
    base_record: SessionRecord | None = None
    partial_state: bytes | None = None
    partial_logprobs: list[float] = field(default_factory=list)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class StepResult:
    record: SessionRecord  # the session after the step
    input_logprobs: list[float]
    next_logprobs: torch.Tensor  # (V,) float32
    replayed: bool = False  # True when a retried step got the stored reply instead of a new model step


def encode_reply(input_logprobs: list[float], next_logprobs: torch.Tensor) -> bytes:
    """Pack a reply as uint32 n, n float64 input log-probs, then V float32 next-token log-probs (little-endian)."""
    return (
        struct.pack(f"<I{len(input_logprobs)}d", len(input_logprobs), *input_logprobs)
        + next_logprobs.numpy().astype("<f4").tobytes()
    )


def decode_reply(data: bytes) -> tuple[list[float], torch.Tensor]:
    (count,) = struct.unpack_from("<I", data)
    input_logprobs = list(struct.unpack_from(f"<{count}d", data, 4))
    next_logprobs = torch.frombuffer(bytearray(data[4 + 8 * count :]), dtype=torch.float32)
    return input_logprobs, next_logprobs


class Scheduler:
    def __init__(
        self,
        name: str,
        runner: ModelRunner,
        store: SessionStore,
        max_batch: int = 64,
        max_wait_s: float = 0.002,
        observer: EngineObserver | None = None,
        max_chunk_tokens: int = 256,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"invalid max batch {max_batch}; must be at least 1")
        self.name = name
        self.runner = runner
        self.store = store
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        if max_chunk_tokens < 1:
            raise ValueError(f"invalid max chunk tokens {max_chunk_tokens}; must be at least 1")
        self.max_chunk_tokens = max_chunk_tokens
        self._in_progress: list[StepWork] = []  # long inputs partway through; only the scheduler thread uses it
        self._long_turn = True  # with max_batch 1, whether the next batch goes to an input partway through
        self.observer = observer or EngineObserver()
        config = runner.bundle.config
        self._labels = (name, config.architecture, str(runner.device))
        self._pending: collections.deque[StepWork] = collections.deque()
        self._cond = threading.Condition()
        self._running = True
        self._mean_batch = 1.0
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    def submit(self, work: StepWork) -> concurrent.futures.Future:
        with self._cond:
            if not self._running:
                raise StoreUnavailable(f"model {self.name} is shutting down")
            self._pending.append(work)
            self._cond.notify()
        return work.future

    @property
    def queued(self) -> int:
        return len(self._pending)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take_batch(self) -> list[StepWork]:
        with self._cond:
            while not self._pending and not self._in_progress and self._running:
                self._cond.wait()
            if not self._running:
                return []
            # Wait briefly for a batch as large as recent ones; a lone client's mean is ~1, so it never waits.
            target = min(self.max_batch, int(self._mean_batch + 0.5))
            if self.max_wait_s > 0 and not self._in_progress and len(self._pending) < target:
                self._cond.wait_for(lambda: len(self._pending) >= target, timeout=self.max_wait_s)
            # Inputs partway through keep their sessions busy until they finish. While other
            # steps wait they get at most half the batch (every other batch when max_batch is 1),
            # so long inputs never starve the rest.
            slots = self.max_batch
            if self._pending:
                slots = self.max_batch // 2
                if slots == 0:
                    slots, self._long_turn = int(self._long_turn), not self._long_turn
            batch, self._in_progress = self._in_progress[:slots], self._in_progress[slots:]
            deferred = []
            sessions = {work.session_id for work in batch} | {work.session_id for work in self._in_progress}
            while self._pending and len(batch) < self.max_batch:
                work = self._pending.popleft()
                if work.session_id in sessions:
                    deferred.append(work)
                elif work.future.set_running_or_notify_cancel():
                    sessions.add(work.session_id)
                    batch.append(work)
            self._pending.extendleft(reversed(deferred))
        self._mean_batch = 0.9 * self._mean_batch + 0.1 * max(len(batch), 1)
        return batch

    def _loop(self) -> None:
        while self._running:
            batch = self._take_batch()
            if not batch:
                continue
            try:
                self._execute(batch)
            except Exception:  # noqa: BLE001 - the loop must survive any one batch
                logger.exception("batch of %d steps for model %s failed; running its steps one by one", len(batch), self.name)
                self._execute_alone([work for work in batch if not work.future.done()])
        with self._cond:
            for work in self._pending:
                if work.future.set_running_or_notify_cancel():
                    work.future.set_exception(StoreUnavailable(f"model {self.name} is shutting down"))
            self._pending.clear()

    def _execute_alone(self, batch: list[StepWork]) -> None:
        """Run each step of a failed batch on its own, so one bad step fails alone."""
        for work in batch:
            try:
                self._execute([work])
            except Exception as error:  # noqa: BLE001 - reported to this step's caller
                logger.exception("step of session %s on model %s failed", work.session_id, self.name)
                if not work.future.done():
                    work.future.set_exception(error)

    def _execute(self, batch: list[StepWork]) -> None:
        started = time.monotonic()
        self.observer.queue_depth(*self._labels, len(self._pending))
        loaded = [work for work in batch if work.new_record is None and work.base_record is None]
        try:
            records = self.store.load_many([work.session_id for work in loaded]) if loaded else []
        except StoreUnavailable as error:
            for work in batch:
                work.future.set_exception(error)
            return
        by_work = dict(zip(map(id, loaded), records))

        runnable: list[tuple[StepWork, SessionRecord]] = []
        for work in batch:
            if work.base_record is not None:
                runnable.append((work, work.base_record))  # checked when its first chunk ran
                continue
            record = work.new_record if work.new_record is not None else by_work[id(work)]
            try:
                if self._check(work, record):
                    runnable.append((work, record))
            except RnnstreamError as error:
                work.future.set_exception(error)
        peeks = [(work, record) for work, record in runnable if not work.tokens]
        if peeks:
            # A step with no tokens reads the next-token distribution without writing the session.
            distributions = self.runner.peek([record.state for _, record in peeks])
            for row, (work, record) in enumerate(peeks):
                work.future.set_result(StepResult(record, [], distributions[row]))
            runnable = [(work, record) for work, record in runnable if work.tokens]
        if not runnable:
            return
        loaded_at = time.monotonic()

        # Inputs longer than max_chunk_tokens run a chunk per batch, so one long prompt
        # delays the other sessions' steps by one chunk's compute, not by its whole length.
        first_waits = [started - work.enqueued_at for work, _ in runnable if work.offset == 0]
        chunks = [work.tokens[work.offset : work.offset + self.max_chunk_tokens] for work, _ in runnable]
        states = [work.partial_state or record.state for work, record in runnable]
        outputs = self.runner.step(chunks, states)
        computed_at = time.monotonic()

        timestamp = now_ms()
        updates, created = [], []
        for (work, record), chunk, output in zip(runnable, chunks, outputs):
            work.offset += len(chunk)
            if work.offset < len(work.tokens):
                work.base_record, work.partial_state = record, output.state
                work.partial_logprobs.extend(output.input_logprobs)
                self._in_progress.append(work)
                continue
            if work.partial_logprobs:
                output.input_logprobs = work.partial_logprobs + output.input_logprobs
            reply = encode_reply(output.input_logprobs, output.next_logprobs)
            new = record.advanced(len(work.tokens), output.state, timestamp, work.reply_tag, reply)
            (created if work.new_record is not None else updates).append((work, record, new, output))

        try:
            results = self.store.save_many([(new, record.position) for _, record, new, _ in updates]) if updates else []
            inserted = [self.store.create(new) for _, _, new, _ in created]
        except StoreUnavailable as error:
            # NOTE: a write that timed out may still have been applied. A client retry that
            # carries expected_position is recognised by the stored tag and not applied twice;
            # a retry without one looks like a new step.
            for work, _, _, _ in updates + created:
                if not work.future.done():
                    work.future.set_exception(error)
            return

        stored_at = time.monotonic()
        self._report(
            BatchStats(
                *self._labels,
                size=len(runnable),
                tokens=sum(len(chunk) for chunk in chunks),
                request_tokens=[len(work.tokens) for work, *_ in updates + created],
                queue_wait_s=first_waits,
                load_s=loaded_at - started,
                compute_s=computed_at - loaded_at,
                store_s=stored_at - computed_at,
                bytes_read=sum(len(record.state) for work, record in runnable if id(work) in by_work),
                bytes_written=sum(len(new.state) for _, _, new, _ in updates + created),
            )
        )

        for (work, _, new, output), result in zip(updates, results):
            if result.status is SaveStatus.SAVED:
                work.future.set_result(StepResult(new, output.input_logprobs, output.next_logprobs))
            elif result.status is SaveStatus.MISSING:
                work.future.set_exception(NotFound(f"session {work.session_id} was deleted or expired during the step"))
            else:
                self._requeue_conflict(work)
        for (work, _, new, output), ok in zip(created, inserted):
            if ok:
                work.future.set_result(StepResult(new, output.input_logprobs, output.next_logprobs))
            else:
                work.future.set_exception(_already_exists(work.session_id))

    def _report(self, stats: BatchStats) -> None:
        """Pass batch figures to the observer; a failing observer must not fail the steps."""
        try:
            self.observer.batch_done(stats)
        except Exception:  # noqa: BLE001 - metrics are not worth a lost step
            logger.exception("observer failed to record a batch of model %s", self.name)

    def _check(self, work: StepWork, record: SessionRecord | None) -> bool:
        """Validate a loaded session for work; return False when work was resolved without a model step."""
        if record is None:
            raise NotFound(f"session {work.session_id} not found (it may have expired or been deleted)")
        if record.model != self.name:
            raise WrongModel(work.session_id, record.model)
        if record.fingerprint != self.runner.bundle.fingerprint:
            raise FailedPrecondition(
                f"session {work.session_id} contains state of model {record.model} (fingerprint "
                f"{record.fingerprint}), not of model {self.name} (fingerprint {self.runner.bundle.fingerprint})"
            )
        if tuple(record.shape) != self.runner.state_shape or len(record.state) != self.runner.state_nbytes:
            raise FailedPrecondition(
                f"session {work.session_id} state has shape {record.shape} and {len(record.state)} bytes; "
                f"model {self.name} expects shape {self.runner.state_shape} and {self.runner.state_nbytes} bytes"
            )
        if work.new_record is not None:
            return True  # a session being created from a prompt: nothing stored to compare with
        expected = work.expected_position
        if (
            work.reply_tag
            and record.reply_tag == work.reply_tag
            and (expected is None or record.position == expected + len(work.tokens))
        ):
            # This very step was applied before: a client retry, or our own write re-sent after a timeout.
            input_logprobs, next_logprobs = decode_reply(record.reply)
            work.future.set_result(StepResult(record, input_logprobs, next_logprobs, replayed=True))
            return False
        if expected is None or record.position == expected:
            return True
        raise PositionMismatch(work.session_id, expected, record.position)

    def _requeue_conflict(self, work: StepWork) -> None:
        """Queue a step again after another writer (another replica) changed its session first.

        The retry waits a random, growing backoff so two replicas racing on one
        session do not keep colliding in lockstep.
        """
        work.conflicts += 1
        if work.conflicts > MAX_CONFLICT_RETRIES:
            work.future.set_exception(
                PositionMismatch(work.session_id, work.expected_position or -1, -1)
                if work.expected_position is not None
                else StoreUnavailable(f"session {work.session_id} is contended; gave up after {work.conflicts} tries")
            )
            return
        logger.debug("session %s changed during its step; retry %d", work.session_id, work.conflicts)
        retry = StepWork(
            session_id=work.session_id,
            tokens=work.tokens,
            future=concurrent.futures.Future(),
            expected_position=work.expected_position,
            reply_tag=work.reply_tag,
            conflicts=work.conflicts,
        )
        retry.future.add_done_callback(lambda done: _forward(done, work.future))
        delay = random.uniform(0, min(CONFLICT_BACKOFF_CAP_S, CONFLICT_BACKOFF_S * 2**work.conflicts))
        timer = threading.Timer(delay, self._resubmit, (retry,))
        timer.daemon = True
        timer.start()

    def _resubmit(self, work: StepWork) -> None:
        with self._cond:
            if not self._running:
                work.future.set_exception(StoreUnavailable(f"model {self.name} is shutting down"))
                return
            self._pending.appendleft(work)
            self._cond.notify()


def _forward(source: concurrent.futures.Future, target: concurrent.futures.Future) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


def _already_exists(session_id: str) -> AlreadyExists:
    return AlreadyExists(f"session {session_id} already exists; choose another id or omit it")
