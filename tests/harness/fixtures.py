"""The mesh fixtures, started once per test session and shared by every
module that asks for them (tests/integration/conftest.py offers them):

  mesh     the launched mesh in front of two TGI doubles, no API keys
  secured  the same with API keys on (API_KEY) and two requests per model
           admitted at once
  clean    the mesh a test asked for (`mesh`, or a module's own override of
           it), with both doubles back to their start state and every model
           ready, before the test and after it

A test that changes a double's behaviour uses `clean`; one that changes
anything else in a running process (a flag, a restart) starts its own mesh.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.mesh import Mesh, reset, running_mesh

API_KEY = "sk-llmmesh-test-key-4242"


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with running_mesh(tmp_path_factory.mktemp("mesh")) as started:
        yield started


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with running_mesh(tmp_path_factory.mktemp("secured"), "--max-concurrent-requests", "2",
                      api_key=API_KEY) as started:
        yield started


@pytest.fixture
def clean(mesh: Mesh) -> Iterator[Mesh]:
    reset(mesh)
    yield mesh
    for double in mesh.doubles.values():
        double.reset()
