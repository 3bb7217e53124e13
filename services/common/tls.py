"""Optional TLS for the gRPC services: a certificate and key to serve with,
and a CA that makes it mutual (peers must present a certificate it signed).
The same files identify the service when it calls its own upstreams."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsFiles:
    cert: bytes
    key: bytes
    ca: bytes | None

    @classmethod
    def load(cls, cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
        """None when no certificate is given (plaintext); a clear exit when half is."""
        if not cert and not key:
            if ca:
                raise SystemExit("--tls-ca needs --tls-cert and --tls-key")
            return None
        if not (cert and key):
            raise SystemExit("TLS needs both --tls-cert and --tls-key")
        return cls(_read(cert), _read(key), _read(ca) if ca else None)

    @property
    def mutual(self) -> bool:
        return self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with the certificate; with a CA, refuse clients without one it signed."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.mutual
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Call peers signed by the CA, presenting this service's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {path}: {exc}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --tls-* flags every gRPC service takes (LLMMESH_TLS_* in containers)."""
    group = parser.add_argument_group("TLS (off unless --tls-cert and --tls-key are given)")
    group.add_argument("--tls-cert", default=None,
                       help="PEM certificate to serve with (and to present to upstreams)")
    group.add_argument("--tls-key", default=None, help="its PEM key")
    group.add_argument("--tls-ca", default=None,
                       help="PEM CA: require client certificates it signed (mutual TLS) "
                            "and verify upstreams against it")


def from_arguments(args: argparse.Namespace) -> TlsFiles | None:
    return TlsFiles.load(args.tls_cert, args.tls_key, args.tls_ca)
