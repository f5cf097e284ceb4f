"""The RnnStream servicer: protobuf in, engine calls, protobuf out."""

from __future__ import annotations

import logging

import grpc
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

from ..engine.generation import GeneratedToken, generate, validate_params
from ..engine.sessions import SessionManager, new_session_id
from ..errors import InvalidArgument, WrongModel
from . import convert
from .status import stream_errors, unary_errors

logger = logging.getLogger(__name__)


async def _prepend(first, rest):
    yield first
    async for item in rest:
        yield item


def _optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


class RnnStreamServicer(pb_grpc.RnnStreamServicer):
    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    @unary_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        models = [convert.model_info(model) for _, model in sorted(self.manager.models.items())]
        return pb.ListModelsResponse(models=models)

    @unary_errors
    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext):
        manager = self.manager
        model = manager.model(request.model)
        session_id = manager.check_session_id(request.session_id) if request.session_id else new_session_id()
        ttl_s = manager.check_ttl(request.ttl_seconds)
        top_k = manager.check_top_k(model, _optional(request, "top_k"))
        prompt = manager.encode_input(
            model, list(request.prompt_token_ids), _optional(request, "prompt"), field="prompt", required=False
        )
        record, result = await manager.create(model.name, session_id, ttl_s, prompt)
        logger.debug("created session %s for model %s at position %d", session_id, model.name, record.position)
        if result is None:
            next_logprobs = model.runner.initial_logprobs
            input_logprobs: list[float] = []
        else:
            next_logprobs = result.next_logprobs
            input_logprobs = result.input_logprobs
        return pb.CreateSessionResponse(
            session_id=session_id,
            position=record.position,
            next_tokens=convert.predictions(model, next_logprobs, top_k),
            input_logprobs=input_logprobs,
            input_token_ids=prompt,
            session=convert.session_info(record),
        )

    @unary_errors
    async def Step(self, request: pb.StepRequest, context: grpc.aio.ServicerContext):
        return await self._step(request)

    async def _step(self, request: pb.StepRequest) -> pb.StepResponse:
        manager = self.manager
        session_id = manager.check_session_id(request.session_id)
        top_k = _optional(request, "top_k")
        if top_k is not None and top_k > 0:
            # Reject an out-of-range top_k before the step changes the session.
            model = await manager.model_of(session_id)
            manager.check_top_k(model, top_k)
        model, tokens, result = await manager.step(
            session_id,
            list(request.token_ids),
            _optional(request, "text"),
            _optional(request, "expected_position"),
        )
        return pb.StepResponse(
            session_id=session_id,
            position=result.record.position,
            next_tokens=convert.predictions(model, result.next_logprobs, manager.check_top_k(model, top_k)),
            input_logprobs=result.input_logprobs,
            input_token_ids=tokens,
        )

    @stream_errors
    async def StreamSession(self, request_iterator, context: grpc.aio.ServicerContext):
        session_id = None
        async for request in request_iterator:
            if session_id is None:
                session_id = self.manager.check_session_id(request.session_id)
            elif request.session_id and request.session_id != session_id:
                raise InvalidArgument(
                    f"session_id {request.session_id!r} differs from this stream's session {session_id!r}; "
                    "open one stream per session"
                )
            request.session_id = session_id
            yield await self._step(request)

    @stream_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        manager = self.manager
        session_id = manager.check_session_id(request.session_id)
        for attempt in range(2):
            model = await manager.model_of(session_id)
            params = validate_params(
                manager,
                model,
                request.max_tokens,
                _optional(request, "temperature"),
                request.top_k,
                _optional(request, "top_p"),
                _optional(request, "seed"),
                list(request.stop),
            )
            prompt = manager.encode_input(
                model, list(request.prompt_token_ids), _optional(request, "prompt"), field="prompt", required=False
            )
            events = generate(manager, model, session_id, prompt, _optional(request, "expected_position"), params)
            try:
                first = await anext(events)
            except WrongModel as error:
                # The routing cache was stale (the id was re-created for another model); nothing was applied.
                if attempt == 1:
                    raise
                manager.reroute(session_id, error.model)
                continue
            break
        async for event in _prepend(first, events):
            if isinstance(event, GeneratedToken):
                yield pb.GenerateResponse(
                    token_ids=[event.token_id], text=event.text, logprobs=[event.logprob], position=event.position
                )
            else:
                yield pb.GenerateResponse(text=event.text, position=event.position, finish_reason=event.finish_reason)

    @unary_errors
    async def GetSession(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext):
        record = await self.manager.get(self.manager.check_session_id(request.session_id))
        return convert.session_info(record)

    @unary_errors
    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext):
        session_id = self.manager.check_session_id(request.session_id)
        await self.manager.delete(session_id)
        logger.debug("deleted session %s", session_id)
        return pb.DeleteSessionResponse()

    @unary_errors
    async def ForkSession(self, request: pb.ForkSessionRequest, context: grpc.aio.ServicerContext):
        manager = self.manager
        session_id = manager.check_session_id(request.session_id)
        new_id = manager.check_session_id(request.new_session_id, "new_session_id") if request.new_session_id else new_session_id()
        ttl_s = manager.check_ttl(request.ttl_seconds) if request.ttl_seconds else 0
        return convert.session_info(await manager.fork(session_id, new_id, ttl_s))

    @unary_errors
    async def ResetSession(self, request: pb.ResetSessionRequest, context: grpc.aio.ServicerContext):
        record = await self.manager.reset(self.manager.check_session_id(request.session_id))
        return convert.session_info(record)

    @unary_errors
    async def ExportState(self, request: pb.ExportStateRequest, context: grpc.aio.ServicerContext):
        record, blob = await self.manager.export_state(self.manager.check_session_id(request.session_id))
        return pb.ExportStateResponse(blob=blob, session=convert.session_info(record))

    @unary_errors
    async def ImportState(self, request: pb.ImportStateRequest, context: grpc.aio.ServicerContext):
        manager = self.manager
        session_id = manager.check_session_id(request.session_id) if request.session_id else new_session_id()
        record = await manager.import_state(request.blob, session_id, manager.check_ttl(request.ttl_seconds))
        return convert.session_info(record)
