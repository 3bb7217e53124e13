"""A TGI-compatible HTTP server over a CPU engine (llama.cpp).

The HTTP layer (`server.create_app`) speaks Text Generation Inference's API so
the adapters cannot tell it from a real TGI. It depends only on the small
`engine.Engine` protocol: `engine.LlamaCppEngine` is the real CPU backend and
`tools.tgi_double.ScriptedEngine` the scriptable test double.
"""
