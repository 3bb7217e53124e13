"""The adapter: one model behind the GenerateService, wrapping one TGI backend."""
