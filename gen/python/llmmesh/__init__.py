"""Generated stubs of the llmmesh protobuf contract."""
