"""Reflection clients (like grpcurl) can discover and call the API with no generated stubs."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def test_step_through_reflection_only(server):
    channel = grpc.insecure_channel(server.target)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = database.get_services()
    assert "rnnstream.v1.RnnStream" in services
    assert "grpc.health.v1.Health" in services

    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("rnnstream.v1.RnnStream")
    methods = {method.name: method for method in service.methods}
    for name in ("ListModels", "CreateSession", "Step", "GetSession", "DeleteSession"):
        assert name in methods

    def call(name: str, body: dict) -> dict:
        method = methods[name]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        rpc = channel.unary_unary(
            f"/{service.full_name}/{name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        reply = rpc(json_format.ParseDict(body, request_class()), timeout=10)
        return json_format.MessageToDict(reply)

    models = call("ListModels", {})["models"]
    assert {model["architecture"] for model in models} == {"lstm", "gru"}
    created = call("CreateSession", {"model": "tiny-gru"})
    reply = call("Step", {"sessionId": created["sessionId"], "text": "Hello", "topK": 3})
    assert reply["position"] == "5"
    assert len(reply["nextTokens"]) == 3
    assert len(reply["inputLogprobs"]) == 5
    assert call("GetSession", {"sessionId": created["sessionId"]})["position"] == "5"
    channel.close()


def test_health_reports_serving(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rnnstream.v1.RnnStream"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
