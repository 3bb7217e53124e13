"""The tenants file, key lookup, priority resolution and reloading."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal

import pytest

from services.common.errors import MeshError, Reason
from services.tenancy.book import TenantBook
from services.tenancy.priority import HEADER, SERVICE_TIER, Priority, resolve
from services.tenancy.tenants import (
    TenantLimits,
    TenantsFileError,
    parse_tenants,
    tenants_from_key_file,
    tenants_from_keys,
)

FILE = """\
tenants:
  - name: search
    keys: [sk-search-1, sk-search-2]
    models: [Qwen2]
    priority: interactive
    weight: 3
    admin: true
    limits: {requests_per_minute: 600, tokens_per_minute: 20000, tokens_per_day: 1000000,
             concurrent: 16}
  - name: nightly
    key_sha256: [NIGHTLY_DIGEST]
    priority: batch
    max_priority: standard
""".replace("NIGHTLY_DIGEST", hashlib.sha256(b"sk-nightly").hexdigest())

MODELS = {"qwen2": "qwen2", "Qwen2": "qwen2", "llama3": "llama3"}


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def test_file_reads_every_field_and_defaults():
    tenants = parse_tenants(FILE, "t.yaml", MODELS.get)
    search = tenants.by_key("sk-search-2")
    assert search is not None and search.name == "search"
    assert search.models == frozenset({"qwen2"})  # canonical id, not the alias given
    assert search.priority is Priority.INTERACTIVE and search.cap is Priority.INTERACTIVE
    assert search.weight == 3.0 and search.admin
    assert search.limits == TenantLimits(600, 20000, 1_000_000, 16)
    nightly = tenants.by_key("sk-nightly")
    assert nightly is not None and nightly.name == "nightly"
    assert nightly.models is None and nightly.allows("llama3")
    assert nightly.priority is Priority.BATCH and nightly.cap is Priority.STANDARD
    assert nightly.limits.unlimited and not nightly.admin
    assert tenants.by_key("sk-search-3") is None
    assert tenants.named("nightly") is nightly


def test_only_digests_are_kept():
    tenants = parse_tenants(FILE, "t.yaml", MODELS.get)
    assert "sk-search-1" not in repr(tenants)
    assert hashlib.sha256(b"sk-nightly").hexdigest() not in repr(tenants)
    assert "digest" not in repr(tenants) and "search" in repr(tenants)
    assert all(len(d) == 32 for d in tenants.by_digest)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("tenants:\n  - name: a\n    keys: [k\n", 4, "not valid YAML"),
        ("", None, "empty"),
        ("tenant: []\n", 1, "unknown field 'tenant' (did you mean 'tenants'?)"),
        ("tenants: []\n", 1, "non-empty list"),
        ("tenants:\n  - keys: [k]\n", 2, "needs a `name`"),
        ("tenants:\n  - name: a\n", 2, "needs `keys`"),
        ("tenants:\n  - name: a b\n    keys: [k]\n", 2, "name must be"),
        ("tenants:\n  - name: a\n    keys: [k]\n    wieght: 2\n", 4,
         "unknown field 'wieght' (did you mean 'weight'?)"),
        ("tenants:\n  - name: a\n    keys: [k]\n    priority: urgent\n", 4, "priority must be"),
        ("tenants:\n  - name: a\n    keys: [k]\n    priority: batch\n    max_priority: batch\n"
         "  - name: b\n    keys: [j]\n    priority: standard\n    max_priority: batch\n",
         9, "below its priority"),
        ("tenants:\n  - name: a\n    keys: [k]\n    weight: 0\n", 4, "weight must be"),
        ("tenants:\n  - name: a\n    keys: [k]\n    weight: yes\n", 4, "weight must be"),
        ("tenants:\n  - name: a\n    keys: [k]\n    models: [gpt4]\n", 4, "unknown model 'gpt4'"),
        ("tenants:\n  - name: a\n    keys: [k]\n    limits:\n      concurrent: 0\n", 5,
         "limits.concurrent must be"),
        ("tenants:\n  - name: a\n    keys: [k]\n    limits: {tokens_per_hour: 5}\n", 4,
         "unknown field 'tokens_per_hour' (did you mean 'tokens_per_day'?)"),
        ("tenants:\n  - name: a\n    keys: [k]\n  - name: a\n    keys: [j]\n", 4, "given twice"),
        ("tenants:\n  - name: a\n    keys: [k]\n  - name: b\n    keys: [j, k]\n", 5,
         "tenant 'a' has too"),
        ("tenants:\n  - name: a\n    key_sha256: [abc]\n", 3, "64 hex digits"),
        ("tenants:\n  - name: a\n    keys: [k]\n    admin: 1\n", 4, "true or false"),
        ("tenants:\n  - name: a\n    keys: [2001-13-45]\n", 3, "not a valid value"),
        ("tenants:\n  - name: a\n    keys: [42]\n", 3, "non-empty string"),
        ("tenants:\n  - name: a\n    keys: k\n", 3, "must be a list"),
    ],
)
def test_every_fault_names_file_and_line(text, line, words):
    with pytest.raises(TenantsFileError) as caught:
        parse_tenants(text, "t.yaml", MODELS.get)
    assert caught.value.line == line
    assert str(caught.value).startswith(f"t.yaml:{line}:" if line else "t.yaml:")
    assert words in str(caught.value)


@pytest.mark.parametrize("text", [
    "tenants:\n  - name: a\n    keys: [sk-secret]\n  - name: b\n    keys: [sk-secret]\n",
    "tenants:\n  - name: a\n    keys: [k]\n    sk-secret: 1\n",  # pasted in the wrong place
    "tenants:\n  - name: a\n    keys: [2001-13-45 sk-secret]\n    weight: sk-secret\n",
])
def test_fault_messages_never_quote_a_key(text):
    with pytest.raises(TenantsFileError) as caught:
        parse_tenants(text, "t.yaml")
    assert "secret" not in str(caught.value)


def test_authenticate():
    tenants = parse_tenants(FILE, "t.yaml", MODELS.get)
    assert tenants.authenticate(bearer("sk-search-1")).name == "search"
    assert tenants.authenticate([("authorization", "bearer  sk-nightly ")]).name == "nightly"
    for metadata in ([], [("authorization", "Basic x")], bearer("sk-none")):
        with pytest.raises(MeshError) as caught:
            tenants.authenticate(metadata)
        assert caught.value.reason is Reason.UNAUTHENTICATED
        assert "sk-none" not in caught.value.message


def test_model_not_allowed_names_the_model():
    search = parse_tenants(FILE, "t.yaml", MODELS.get).named("search")
    assert search is not None
    search.check_model("qwen2")
    with pytest.raises(MeshError) as caught:
        search.check_model("llama3")
    error = caught.value
    assert error.reason is Reason.MODEL_NOT_ALLOWED
    assert error.code == "PERMISSION_DENIED" and error.http_status == 403
    assert "llama3" in error.message and error.metadata["model_id"] == "llama3"


def test_api_keys_become_tenants_without_limits():
    tenants = tenants_from_keys(["k1", "k2", "k1", ""])
    assert len(tenants) == 2
    one, two = tenants.by_key("k1"), tenants.by_key("k2")
    assert one is not None and two is not None and one is not two
    assert (one.name, two.name) == ("key-1", "key-2")
    assert one.limits.unlimited and one.models is None and one.priority is Priority.STANDARD
    with pytest.raises(ValueError):
        tenants_from_keys([])


def test_api_keys_file_and_variable(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# keys\nsk-a\n\nsk-b\n", encoding="utf-8")
    tenants = tenants_from_key_file(path, "sk-c, ,sk-a")
    assert tenants is not None and len(tenants) == 3
    assert [tenants.authenticate(bearer(k)).name for k in ("sk-a", "sk-b", "sk-c")] == [
        "key-1", "key-2", "key-3",
    ]
    assert tenants_from_key_file(None, None) is None
    assert tenants_from_key_file(None, "sk-x") is not None
    path.write_text("# none\n", encoding="utf-8")
    with pytest.raises(TenantsFileError, match="holds no key"):
        tenants_from_key_file(path, None)
    with pytest.raises(TenantsFileError, match="cannot read"):
        tenants_from_key_file(tmp_path / "missing.txt", None)


# -- priority --------------------------------------------------------------------


def test_priority_defaults_and_asks():
    std, inter, batch = Priority.STANDARD, Priority.INTERACTIVE, Priority.BATCH
    assert resolve(std, std) is std
    assert resolve(batch, std, header="standard") is std
    assert resolve(std, std, header=" BATCH ") is batch
    assert resolve(std, inter, header="interactive") is inter
    assert resolve(std, inter, service_tier="priority") is inter
    assert resolve(std, std, service_tier="flex") is batch
    assert resolve(batch, std, service_tier="auto") is batch
    assert resolve(batch, std, service_tier="default") is batch
    # The header wins over service_tier.
    assert resolve(std, inter, header="batch", service_tier="priority") is batch


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"header": "urgent"}, HEADER, "must be one of interactive, standard, batch"),
        ({"header": "interactive"}, HEADER, "above what this API key may use"),
        ({"service_tier": "scale"}, SERVICE_TIER, "must be one of"),
        ({"service_tier": "priority"}, SERVICE_TIER, "at most standard"),
    ],
)
def test_priority_faults_name_the_field(kwargs, field, words):
    with pytest.raises(MeshError) as caught:
        resolve(Priority.STANDARD, Priority.STANDARD, **kwargs)
    error = caught.value
    assert error.reason is Reason.INVALID_ARGUMENT
    assert [v.field for v in error.violations] == [field]
    assert words in error.message


# -- reloading -------------------------------------------------------------------


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    # A new mtime even on coarse clocks.
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def test_reload_swaps_and_a_bad_file_keeps_the_old(tmp_path, caplog):
    path = tmp_path / "tenants.yaml"
    _write(path, "tenants:\n  - name: a\n    keys: [ka]\n")
    book = TenantBook(path)
    before = book.current
    held = before.by_key("ka")  # a request in flight keeps its tenant
    assert not book.changed()
    _write(path, "tenants:\n  - name: b\n    keys: [kb]\n")
    assert book.changed() and book.reload()
    assert book.current.by_key("kb") is not None and book.current.by_key("ka") is None
    assert held is not None and held.name == "a"
    _write(path, "tenants:\n  - name: c\n    keys: [kc]\n    weight: -1\n")
    with caplog.at_level(logging.ERROR, logger="llmmesh.tenancy"):
        assert not book.reload()
    assert book.current.by_key("kb") is not None
    record = next(r for r in caplog.records if "not reloaded" in r.getMessage())
    assert record.line == 4 and str(path) in record.error  # type: ignore[attr-defined]
    assert "kc" not in caplog.text
    assert (book.reloads, book.failed_reloads) == (1, 1)


def test_unreadable_file_at_start_names_it(tmp_path):
    with pytest.raises(TenantsFileError) as caught:
        TenantBook(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(caught.value)


async def test_watch_reloads_on_change(tmp_path):
    path = tmp_path / "tenants.yaml"
    _write(path, "tenants:\n  - name: a\n    keys: [ka]\n")
    book = TenantBook(path)
    task = asyncio.create_task(book.watch(interval=0.01))
    try:
        _write(path, "tenants:\n  - name: b\n    keys: [kb]\n")
        for _ in range(300):
            if book.current.by_key("kb") is not None:
                break
            await asyncio.sleep(0.01)
        assert book.current.by_key("kb") is not None
    finally:
        task.cancel()


async def test_sighup_reloads(tmp_path):
    path = tmp_path / "tenants.yaml"
    _write(path, "tenants:\n  - name: a\n    keys: [ka]\n")
    book = TenantBook(path)
    loop = asyncio.get_running_loop()
    book.reload_on_sighup(loop)
    try:
        _write(path, "tenants:\n  - name: b\n    keys: [kb]\n")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(300):
            if book.reloads:
                break
            await asyncio.sleep(0.01)
        assert book.current.by_key("kb") is not None
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
