"""Generated protobuf and gRPC stubs. DO NOT EDIT: run `make gen`."""
