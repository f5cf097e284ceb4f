"""The gRPC layer: servicer, protobuf conversion, status mapping and server assembly."""
