"""The shared mesh fixtures (tests/harness/fixtures.py) for every module here."""

from tests.harness.fixtures import clean, mesh, secured, traced

__all__ = ["clean", "mesh", "secured", "traced"]
