"""API keys."""

import pytest

from services.common.auth import ApiKeys
from services.common.errors import MeshError, Reason


def check(keys: ApiKeys, header: str | None) -> None:
    keys.check([("authorization", header)] if header is not None else [("x-other", "1")])


def test_valid_keys_pass():
    keys = ApiKeys(["k1", "k2"])
    check(keys, "Bearer k1")
    check(keys, "bearer k2")
    check(keys, "Bearer  k2 ")


@pytest.mark.parametrize(
    ("header", "needle"),
    [(None, "required"), ("k1", "Bearer"), ("Basic k1", "Bearer"), ("Bearer nope", "not valid"),
     ("Bearer ", "not valid"), ("Bearer k1k1", "not valid")],
)
def test_invalid_keys_are_unauthenticated(header, needle):
    with pytest.raises(MeshError) as caught:
        check(ApiKeys(["k1"]), header)
    assert caught.value.reason is Reason.UNAUTHENTICATED
    assert caught.value.code == "UNAUTHENTICATED"
    assert needle in caught.value.message
    assert "k1" not in caught.value.message.replace("Bearer", "")  # no key echoed


def test_load_from_file_and_env(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\nalpha\n\n beta \n")
    keys = ApiKeys.load(path, "gamma, delta")
    assert keys is not None and len(keys) == 4
    check(keys, "Bearer beta")
    check(keys, "Bearer delta")
    assert ApiKeys.load(None, None) is None
    assert ApiKeys.load(None, "") is None


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# nothing\n")
    with pytest.raises(SystemExit, match="no key"):
        ApiKeys.load(path, None)
    with pytest.raises(SystemExit, match="cannot read"):
        ApiKeys.load(tmp_path / "missing", None)
