"""The adapter: one model behind the GenerateService, over one engine (TGI, or an
OpenAI-compatible server such as vLLM) driven by services.adapter.engines."""
