"""llmmesh services: the router (with its OpenAI-compatible face), one adapter
per model over its engine, the CPU backend (an engine that speaks TGI's API
over llama.cpp), the launcher, and what they share (`common`)."""
