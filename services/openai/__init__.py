"""OpenAI's HTTP API over the router's core: `/v1/chat/completions`,
`/v1/completions` and `/v1/models`, served by a second listener of the router
process (no extra hop, no second copy of routing)."""
