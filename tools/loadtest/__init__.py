"""A load test for any llmmesh deployment: `python -m tools.loadtest --help`.

Sends generated or recorded prompts over the native HTTP API (SSE), the gRPC
API or the OpenAI-compatible API, at a fixed request rate (Poisson or bursty
arrivals) or a fixed concurrency, sweeps several of either in one run, and
reports time to first token, time per output token, inter-token and
end-to-end latency percentiles, throughput, errors by reason and goodput
against SLOs, as a terminal table, JSON and PNG plots.
"""
