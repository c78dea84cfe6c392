"""gRPC transport credentials from PEM files, for both ends (torch-free, like the edge). One job.

The cloud serves TLS with its certificate and key, and with mutual TLS when it is given the CA
that signs the edges' certificates; an edge verifies the cloud against a CA file and, for mutual
TLS, presents its own certificate and key. A missing or unreadable file is refused here with its
path and what it was meant to be, before any socket opens.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: str, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p} (make test ones with `fedshift certs DIR --hosts ...`)")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read {what} {p}: {exc}") from exc


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS for the cloud; with ``client_ca`` every edge must present a certificate it signed."""
    pair = (_read(key, "TLS private key (--tls-key)"), _read(cert, "TLS certificate (--tls-cert)"))
    root = _read(client_ca, "client CA (--tls-client-ca)") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=bool(client_ca))


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS for an edge: the cloud verified against ``ca``; ``cert``/``key`` for mutual TLS."""
    if bool(cert) != bool(key):
        raise ValueError("mutual TLS needs both --tls-cert and --tls-key (or neither)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate (--tls-ca)"),
        private_key=_read(key, "TLS private key (--tls-key)") if key else None,
        certificate_chain=_read(cert, "TLS certificate (--tls-cert)") if cert else None)
