"""Tenants: who calls the mesh, how much they may use and how urgently.

Transport-free; the router's core and the HTTP faces call it.

- tenants.py     the tenants file, Tenant and its limits, lookup by key digest
- book.py        the tenants in force, reloaded on change and on SIGHUP
- priority.py    priority bands and the band of one request
- caller.py      who calls and how urgently, resolved once from a request's metadata
- gate.py        per request: check the model, reserve, queue, settle
- tokens.py      what a request reserves; the stated estimate without a tokenizer
- quota.py       sliding windows, reservations, the QuotaStore interface
- quota_memory.py  the store of one router
- quota_redis.py   the store many routers share (Redis, one Lua script)
- admission.py   the per-model queue: priority, weighted fair share, FIFO
- usage.py       the usage report and OpenAI's rate-limit headers
- metrics.py     per-tenant Prometheus metrics

- settings.py    the router's tenancy flags; the store and gate built from them
"""
