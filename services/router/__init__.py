"""The router: one entry point that routes requests to per-model adapters."""
