"""A stream survives the death of its replica: two replicas of a model over
real CPU backends (llama.cpp + SmolLM2), the serving backend or adapter
killed (SIGKILL) in the middle of a greedy stream, which completes on the
other replica with no error and the whole token budget; a sampled stream
that did not opt in keeps its in-band error."""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from llmmesh.v1 import generate_pb2 as pb

from services.cpu_backend.settings import default_model_path
from tests.harness.parts import (
    AdapterPart,
    Part,
    RouterPart,
    _http_ready,
    ready_replicas,
    start_all,
    stop_all,
    stub,
)
from tests.harness.procs import free_port, python_module
from tests.harness.wait import eventually

pytestmark = pytest.mark.integration

BUDGET = 120
PROMPT = "Write a long story about a dragon who learns to bake bread."


class BackendPart(Part):
    """A CPU backend over the SmolLM2 GGUF."""

    def __init__(self, name: str, tmp: Path, gguf: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            name,
            python_module("services.cpu_backend", "--host", "127.0.0.1", "--port", str(self.port),
                          "--model-path", str(gguf), "--served-model-id", "smollm2",
                          "--max-total-tokens", "2048", "--threads", "1"),
            tmp / f"{name}.log",
            _http_ready(f"{self.url}/health"),
        )

    def requests(self) -> int:
        """Requests the backend has received (its tgi_request_count)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("tgi_request_count "):
                    return int(float(line.split()[1]))
        return 0


@dataclass
class TwoReplicas:
    backends: dict[str, BackendPart]
    adapters: dict[str, AdapterPart]
    router: RouterPart

    @property
    def parts(self) -> list[Part]:
        return [*self.backends.values(), *self.adapters.values(), self.router]

    def restore(self) -> None:
        for part in self.parts:
            if not part.alive:
                part.start(120)
        eventually(lambda: ready_replicas(self.router.address, "llama3") == 2, timeout=60)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoReplicas]:
    pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    gguf = default_model_path()
    assert gguf is not None and gguf.is_file(), "SmolLM2 GGUF missing"
    tmp = tmp_path_factory.mktemp("resume")
    backends = {n: BackendPart(f"backend-{n}", tmp, gguf) for n in "ab"}
    adapters = {
        n: AdapterPart(f"adapter-{n}", tmp, "llama3", backends[n],  # type: ignore[arg-type]
                       "--chat-template", str(gguf))
        for n in "ab"
    }
    router = RouterPart(tmp, {"llama3": [a.address for a in adapters.values()]},
                        "--replica-choice", "in-flight", "--timeout", "120")
    two = TwoReplicas(backends, adapters, router)
    try:
        for part in backends.values():
            part.start(120)
        start_all([*adapters.values(), router])
        yield two
    finally:
        stop_all(two.parts)


def request(**params: Any) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        model_id="llama3", inputs=PROMPT,
        parameters=pb.GenerationParameters(max_new_tokens=BUDGET, **params))


def kill_midstream(mesh: TwoReplicas, message: pb.GenerateStreamRequest, which: str
                   ) -> tuple[list[pb.GenerateStreamResponse], str]:
    """Stream `message`; after its third message, SIGKILL the serving replica's
    backend (`which` "backend") or adapter ("adapter"). The messages, and the
    name of the replica killed."""
    before = {n: b.requests() for n, b in mesh.backends.items()}
    stream = stub(mesh.router.address).GenerateStream(message, timeout=120)
    replies = [next(stream) for _ in range(3)]
    serving = [n for n, b in mesh.backends.items() if b.requests() > before[n]]
    assert len(serving) == 1, serving
    victim = mesh.backends[serving[0]] if which == "backend" else mesh.adapters[serving[0]]
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    replies += list(stream)
    return replies, serving[0]


@pytest.fixture
def two(mesh: TwoReplicas) -> Iterator[TwoReplicas]:
    mesh.restore()
    yield mesh


def uninterrupted(mesh: TwoReplicas) -> pb.GenerateStreamResponse:
    return list(stub(mesh.router.address).GenerateStream(request(), timeout=120))[-1]


@pytest.mark.parametrize("which", ["backend", "adapter"])
def test_a_greedy_stream_completes_when_its_replica_dies(two: TwoReplicas, which: str) -> None:
    whole = uninterrupted(two)
    started = time.monotonic()
    replies, victim = kill_midstream(two, request(), which)
    last = replies[-1]
    assert last.finish_reason != pb.FINISH_REASON_ERROR, last.error
    assert not last.HasField("error")
    assert last.resumes == 1
    text = "".join(r.text for r in replies[:-1])
    assert last.generated_text == text
    # One finish and token counts that add up: the budget, as uninterrupted.
    assert last.finish_reason == whole.finish_reason
    if whole.finish_reason == pb.FINISH_REASON_LENGTH:
        assert last.tokens == BUDGET
    assert [r.tokens for r in replies[:-1]] == sorted(r.tokens for r in replies[:-1])
    assert replies[-2].tokens == last.tokens
    assert time.monotonic() - started < 60
    # The continuation came from the other replica's backend.
    other = "b" if victim == "a" else "a"
    assert two.backends[other].alive


def test_a_sampled_stream_without_opt_in_keeps_its_in_band_error(two: TwoReplicas) -> None:
    replies, _ = kill_midstream(two, request(do_sample=True, temperature=0.8, seed=1), "backend")
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_ERROR
    assert (last.error.code, last.error.reason) == ("UNAVAILABLE", "INCOMPLETE_GENERATION")
    assert last.resumes == 0
