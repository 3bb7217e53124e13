"""llama-cpp-python's OpenAI server with a `GET /health` route.

    python -m tests.bench.llama_server --model GGUF --cache True ... (llama_cpp.server's flags)

The same app as `python -m llama_cpp.server`, same flags; vLLM's router
waits for every worker's /health at start (whatever its
--health-check-endpoint), which llama-cpp-python's server lacks. The route
answers 200 once the app is up, as the model is loaded before it serves.
"""

from __future__ import annotations

import argparse
import os

import uvicorn
from llama_cpp.server.app import create_app
from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.llama_server")
    add_args_from_model(parser, Settings)
    args = parser.parse_args()
    server = parse_model_from_args(ServerSettings, args)
    model = parse_model_from_args(ModelSettings, args)
    app = create_app(server_settings=server, model_settings=[model])

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host=os.getenv("HOST", server.host), port=int(os.getenv("PORT", server.port)))


if __name__ == "__main__":
    main()
