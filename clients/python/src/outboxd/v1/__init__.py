"""The outboxd.v1 protobuf messages and gRPC stubs, generated from proto/ (scripts/generate)."""
