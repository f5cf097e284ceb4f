"""Session operations: validate inputs, route steps to the session's model scheduler.

Steps are routed by a cache of session id -> model name, so a step costs no
extra store round trip; a stale entry (a session deleted and re-created for
another model) is detected by the scheduler and the step is routed again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import dataclasses
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, StoreUnavailable, WrongModel
from ..models.bundle import Bundle
from ..state.blob import export_blob, import_blob
from ..state.codec import zero_state
from ..state.record import SaveStatus, SessionRecord
from ..state.store import SessionStore, now_ms
from .observer import EngineObserver
from .runner import ModelRunner
from .scheduler import Scheduler, StepResult, StepWork

logger = logging.getLogger(__name__)

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
ROUTE_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int = 8192
    default_top_k: int = 5
    default_ttl_s: int = 3600
    max_ttl_s: int = 7 * 24 * 3600
    max_generate_tokens: int = 4096


@dataclass
class ServedModel:
    bundle: Bundle
    runner: ModelRunner
    scheduler: Scheduler

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def architecture(self) -> str:
        return self.bundle.config.architecture


def new_session_id() -> str:
    return secrets.token_hex(16)  # 128 random bits


def creation_tag() -> str:
    """Tag a new session's record, so a create re-sent after a timeout is recognised."""
    return "create:" + secrets.token_hex(8)


def request_tag(expected_position: int | None, tokens: list[int]) -> str:
    """Identify a step, so that the store can tell whether it was already applied.

    With an expected position the tag is derived from the request, so a client's
    retry of the same step is recognised. Without one it is unique to this call,
    which still recognises the server's own write re-sent after a timeout.
    """
    if expected_position is None:
        return "once:" + secrets.token_hex(8)
    digest = hashlib.blake2b(repr(tokens).encode(), digest_size=8).hexdigest()
    return f"{expected_position}:{digest}"


class SessionManager:
    def __init__(
        self,
        models: dict[str, ServedModel],
        store: SessionStore,
        limits: Limits,
        observer: EngineObserver | None = None,
    ) -> None:
        self.models = models
        self.store = store
        self.limits = limits
        self.observer = observer or EngineObserver()
        self._routes: OrderedDict[str, str] = OrderedDict()

    # -- validation -------------------------------------------------------

    def model(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"model {name!r} not found; served models: {known}") from None

    def check_session_id(self, session_id: str, field: str = "session_id") -> str:
        if not SESSION_ID_PATTERN.fullmatch(session_id):
            raise InvalidArgument(
                f"invalid {field} {session_id[:140]!r}: use 1 to 128 characters from A-Z a-z 0-9 . _ : -"
            )
        return session_id

    def check_ttl(self, ttl_s: int) -> int:
        if ttl_s == 0:
            return self.limits.default_ttl_s
        if ttl_s > self.limits.max_ttl_s:
            raise InvalidArgument(f"ttl_seconds {ttl_s} exceeds the maximum of {self.limits.max_ttl_s}")
        return ttl_s

    def check_top_k(self, model: ServedModel, top_k: int | None) -> int:
        if top_k is None:
            return min(self.limits.default_top_k, model.bundle.config.vocab_size)
        if top_k > model.bundle.config.vocab_size:
            raise InvalidArgument(
                f"top_k {top_k} is out of range; model {model.name} allows 0 to {model.bundle.config.vocab_size}"
            )
        return top_k

    def encode_input(
        self, model: ServedModel, token_ids: list[int], text: str | None, field: str = "input", required: bool = True
    ) -> list[int]:
        """Return the tokens of an input given as ids or text; both, neither (when required) or empty is invalid."""
        if token_ids and text is not None:
            raise InvalidArgument(f"{field}: give token ids or text, not both")
        if text is not None:
            if text == "":
                raise InvalidArgument(f"{field}: text is empty")
            tokens = model.bundle.tokenizer.encode(text)
        elif token_ids:
            tokens = list(token_ids)
            vocab = model.bundle.config.vocab_size
            for index, token in enumerate(tokens):
                if token >= vocab:
                    raise InvalidArgument(
                        f"{field}: token id {token} at index {index} is outside the vocabulary of model "
                        f"{model.name} (0 to {vocab - 1})"
                    )
        elif required:
            raise InvalidArgument(f"{field}: missing; give token ids or text")
        else:
            return []
        if len(tokens) > self.limits.max_input_tokens:
            raise InvalidArgument(
                f"{field}: {len(tokens)} tokens exceeds the maximum of {self.limits.max_input_tokens} per request"
            )
        return tokens

    # -- routing ------------------------------------------------------------

    def _remember(self, session_id: str, model: str) -> None:
        self._routes[session_id] = model
        self._routes.move_to_end(session_id)
        if len(self._routes) > ROUTE_CACHE_SIZE:
            self._routes.popitem(last=False)

    async def model_of(self, session_id: str) -> ServedModel:
        name = self._routes.get(session_id)
        if name is None:
            record = await asyncio.to_thread(self.store.load, session_id)
            if record is None:
                raise NotFound(f"session {session_id} not found (it may have expired or been deleted)")
            name = record.model
            self._remember(session_id, name)
        return self.model(name)

    def reroute(self, session_id: str, model_name: str) -> None:
        """Route a session to model_name after a step found the cached route stale."""
        self._remember(session_id, model_name)

    def forget(self, session_id: str) -> None:
        self._routes.pop(session_id, None)

    # -- operations ---------------------------------------------------------

    def new_record(self, model: ServedModel, session_id: str, ttl_s: int) -> SessionRecord:
        timestamp = now_ms()
        return SessionRecord(
            session_id=session_id,
            model=model.name,
            fingerprint=model.bundle.fingerprint,
            position=0,
            created_ms=timestamp,
            updated_ms=timestamp,
            ttl_s=ttl_s,
            shape=model.runner.state_shape,
            state=zero_state(model.runner.state_shape),
            reply_tag=creation_tag(),
        )

    async def create(
        self, model_name: str, session_id: str, ttl_s: int, prompt: list[int]
    ) -> tuple[SessionRecord, StepResult | None]:
        """Create a session, feeding the prompt first if there is one.

        With a prompt, the session is written once, after the prompt's step, so a
        failed prompt leaves no session behind.
        """
        model = self.model(model_name)
        record = self.new_record(model, session_id, ttl_s)
        if prompt:
            work = StepWork(
                session_id, prompt, concurrent.futures.Future(), reply_tag=record.reply_tag, new_record=record
            )
            result = await asyncio.wrap_future(model.scheduler.submit(work))
            self._remember(session_id, model.name)
            self.observer.session_created(model.name, model.architecture)
            return result.record, result
        if not await asyncio.to_thread(self.store.create, record):
            raise AlreadyExists(f"session {session_id} already exists; choose another id or omit it")
        self._remember(session_id, model.name)
        self.observer.session_created(model.name, model.architecture)
        return record, None

    async def step(
        self,
        session_id: str,
        token_ids: list[int],
        text: str | None,
        expected_position: int | None,
        field: str = "input",
    ) -> tuple[ServedModel, list[int], StepResult]:
        """Feed an input to a session; return its model, the input tokens and the step result."""
        for _ in range(2):
            model = await self.model_of(session_id)
            tokens = self.encode_input(model, token_ids, text, field)
            tag = request_tag(expected_position, tokens)
            work = StepWork(session_id, tokens, concurrent.futures.Future(), expected_position, tag)
            try:
                result = await asyncio.wrap_future(model.scheduler.submit(work))
            except WrongModel as error:
                logger.debug("session %s moved to model %s; routing again", session_id, error.model)
                self._remember(session_id, error.model)
                continue
            except NotFound:
                self._lost(session_id)
                raise
            return model, tokens, result
        raise NotFound(f"session {session_id} not found (it changed model while being stepped)")

    async def apply(
        self, model: ServedModel, session_id: str, tokens: list[int], expected_position: int | None
    ) -> StepResult:
        """Step a session already routed to model by validated tokens; an empty list only reads the distribution."""
        tag = request_tag(expected_position, tokens) if tokens else ""
        work = StepWork(session_id, tokens, concurrent.futures.Future(), expected_position, tag)
        try:
            return await asyncio.wrap_future(model.scheduler.submit(work))
        except NotFound:
            self._lost(session_id)
            raise

    async def get(self, session_id: str) -> SessionRecord:
        record = await asyncio.to_thread(self.store.load, session_id)
        if record is None:
            self._lost(session_id)
            raise NotFound(f"session {session_id} not found (it may have expired or been deleted)")
        return record

    async def delete(self, session_id: str) -> None:
        model_name = self._routes.pop(session_id, None)
        if not await asyncio.to_thread(self.store.delete, session_id):
            raise NotFound(f"session {session_id} not found (it may have expired or been deleted)")
        if model_name in self.models:
            self.observer.session_deleted(model_name, self.models[model_name].architecture)

    async def fork(self, session_id: str, new_session_id: str, ttl_s: int) -> SessionRecord:
        """Copy a session's model, state and position to a new session."""
        source = await self.get(session_id)
        model = self.model(source.model)
        timestamp = now_ms()
        record = dataclasses.replace(
            source,
            session_id=new_session_id,
            created_ms=timestamp,
            updated_ms=timestamp,
            ttl_s=ttl_s or source.ttl_s,
            reply_tag=creation_tag(),
            reply=b"",
            ttl_remaining_ms=-1,
        )
        await _insert(self, record)
        self._remember(new_session_id, model.name)
        self.observer.session_created(model.name, model.architecture)
        return record

    async def reset(self, session_id: str) -> SessionRecord:
        """Return a session to the zero state at position 0, keeping its id, model and TTL."""
        for _ in range(16):
            current = await self.get(session_id)
            model = self.model(current.model)
            record = dataclasses.replace(
                current,
                fingerprint=model.bundle.fingerprint,
                position=0,
                shape=model.runner.state_shape,
                state=zero_state(model.runner.state_shape),
                updated_ms=now_ms(),
                reply_tag="",
                reply=b"",
                ttl_remaining_ms=-1,
            )
            result = await asyncio.to_thread(self.store.save, record, current.position)
            if result.status is SaveStatus.SAVED:
                return record
            if result.status is SaveStatus.MISSING:
                self._lost(session_id)
                raise NotFound(f"session {session_id} not found (it may have expired or been deleted)")
        raise StoreUnavailable(f"session {session_id} kept changing during reset; try again")

    async def export_state(self, session_id: str) -> tuple[SessionRecord, bytes]:
        record = await self.get(session_id)
        return record, export_blob(record)

    async def import_state(self, blob: bytes, session_id: str, ttl_s: int) -> SessionRecord:
        """Create a session from an exported blob, if a served model has the blob's name and fingerprint."""
        fields = import_blob(blob)
        model = self.model(fields["model"])
        if fields["fingerprint"] != model.bundle.fingerprint:
            raise FailedPrecondition(
                f"state blob was exported from model {model.name} with fingerprint {fields['fingerprint']}; "
                f"this server's {model.name} has fingerprint {model.bundle.fingerprint}"
            )
        if fields["shape"] != model.runner.state_shape or fields["dtype"] != "float32":
            raise FailedPrecondition(
                f"state blob has {fields['dtype']} state of shape {fields['shape']}; model {model.name} "
                f"expects float32 of shape {model.runner.state_shape}"
            )
        timestamp = now_ms()
        record = SessionRecord(
            session_id=session_id,
            model=model.name,
            fingerprint=model.bundle.fingerprint,
            position=fields["position"],
            created_ms=timestamp,
            updated_ms=timestamp,
            ttl_s=ttl_s,
            shape=model.runner.state_shape,
            state=fields["state"],
            reply_tag=creation_tag(),
        )
        await _insert(self, record)
        self._remember(session_id, model.name)
        self.observer.session_created(model.name, model.architecture)
        return record

    def _lost(self, session_id: str) -> None:
        """Forget a session found missing; count it as expired if this replica had routed it."""
        model_name = self._routes.pop(session_id, None)
        if model_name in self.models:
            self.observer.session_expired(model_name, self.models[model_name].architecture)


async def _insert(manager: "SessionManager", record: SessionRecord) -> None:
    if not await asyncio.to_thread(manager.store.create, record):
        raise AlreadyExists(f"session {record.session_id} already exists; choose another id or omit it")


def top_k_of(next_logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k == 0:
        return []
    values, indices = torch.topk(next_logprobs, k)
    return list(zip(indices.tolist(), values.double().tolist()))
