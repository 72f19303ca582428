"""A throwaway PKI for tests: a trustme CA and a loopback server cert."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trustme

from mptls.tls.config import TLSConfig

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "127.0.0.2", "127.0.0.3", "::1")


@dataclasses.dataclass(frozen=True)
class Pki:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    def server(self, **kw: object) -> TLSConfig:
        return TLSConfig(certfile=self.cert_pem, keyfile=self.key_pem, **kw)  # type: ignore[arg-type]

    def client(self, **kw: object) -> TLSConfig:
        return TLSConfig(cafile=self.ca_pem, **kw)  # type: ignore[arg-type]


def make_pki(directory: Path) -> Pki:
    ca = trustme.CA()
    cert = ca.issue_cert(*LOOPBACK_NAMES)
    ca_pem = directory / "ca.pem"
    cert_pem = directory / "server.pem"
    key_pem = directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    with open(cert_pem, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return Pki(ca_pem, cert_pem, key_pem)
