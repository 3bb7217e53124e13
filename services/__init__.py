"""llmmesh services: router, adapters and the CPU backend."""
