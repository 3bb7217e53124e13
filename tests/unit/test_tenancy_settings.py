"""The router's tenancy flags and what is built from them."""

from __future__ import annotations

import argparse

import pytest

from services.common import envflags
from services.tenancy.quota_memory import MemoryQuotaStore
from services.tenancy.quota_redis import FailurePolicy, RedisQuotaStore
from services.tenancy.settings import (
    add_tenancy_arguments,
    make_gate,
    make_store,
    tenancy_settings,
)


def parse(argv, env=None):
    parser = argparse.ArgumentParser()
    add_tenancy_arguments(parser)
    envflags.apply(parser, env or {})
    return tenancy_settings(parser, parser.parse_args(argv))


def test_defaults_are_one_router_in_memory():
    settings = parse([])
    assert settings.tenants_file is None and settings.quota_store == "memory"
    assert settings.quota_failure is FailurePolicy.CLOSED
    assert isinstance(make_store(settings), MemoryQuotaStore)


async def test_flags_and_environment():
    settings = parse(
        ["--quota-store", "redis://127.0.0.1:6390", "--quota-failure", "open",
         "--quota-share", "0.5", "--queue-timeout", "5"],
        {"LLMMESH_TENANTS_FILE": "/etc/tenants.yaml", "LLMMESH_QUEUE_SIZE": "16"},
    )
    assert str(settings.tenants_file) == "/etc/tenants.yaml" and settings.queue_size == 16
    assert settings.quota_failure is FailurePolicy.OPEN and settings.quota_share == 0.5
    store = make_store(settings)
    assert isinstance(store, RedisQuotaStore) and store.policy is FailurePolicy.OPEN
    await store.close()
    gate = make_gate(parse(["--queue-size", "3"]), {"qwen2": 8})
    queue = gate.queues["qwen2"]
    assert queue.capacity == 8 and queue.model == "qwen2"


@pytest.mark.parametrize(("argv", "words"), [
    (["--quota-store", "postgres://x"], "--quota-store must be"),
    (["--quota-share", "0"], "--quota-share must be"),
    (["--quota-share", "1.5"], "--quota-share must be"),
    (["--queue-timeout", "0"], "--queue-timeout must be"),
    (["--queue-size", "0"], "--queue-size must be"),
    (["--quota-failure", "maybe"], "invalid choice"),
])
def test_bad_flags_end_the_program_naming_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert words in capsys.readouterr().err
