"""Markers for the whole suite (tests/harness/markers.py); where each kind of
test goes is said in tests/harness/__init__.py."""

from __future__ import annotations

import pytest

from tests.harness import markers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        markers.apply(item)
