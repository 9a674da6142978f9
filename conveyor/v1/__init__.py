"""Generated protobuf and gRPC stubs of the `conveyor.v1` contract (see protos/)."""
