"""Shared building blocks: domain types, the error table, validation, gRPC plumbing."""
