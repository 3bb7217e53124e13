"""TLS settings of the gRPC services."""

import pytest

from services.common.tls import TlsFiles


def test_plaintext_when_nothing_is_given():
    assert TlsFiles.load(None, None, None) is None


@pytest.mark.parametrize(("cert", "key", "ca"), [("c", None, None), (None, "k", None),
                                                 (None, None, "ca")])
def test_half_a_configuration_is_refused(cert, key, ca):
    with pytest.raises(SystemExit, match="tls"):
        TlsFiles.load(cert, key, ca)


def test_files_are_read_and_ca_makes_it_mutual(tmp_path):
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_bytes(name.encode())
    server_only = TlsFiles.load(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), None)
    assert server_only is not None and not server_only.mutual
    mutual = TlsFiles.load(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"),
                           str(tmp_path / "ca.pem"))
    assert mutual is not None and mutual.mutual and mutual.ca == b"ca.pem"
    with pytest.raises(SystemExit, match="cannot read"):
        TlsFiles.load(str(tmp_path / "missing.pem"), str(tmp_path / "k.pem"), None)
