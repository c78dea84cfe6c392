"""Test certificates: a local CA, a server certificate for the given hosts and one client
certificate per edge (``fedshift certs DIR --hosts … --edges …``). One job.

For a test bed or a lab, not a PKI: the CA key sits beside the certificates it signed. Keys are
ECDSA P-256; certificates are valid for ``days`` days. Layout of ``DIR``::

    ca.pem  ca.key  server.pem  server.key  edges/<id>.pem  edges/<id>.key

The server certificate carries every host as a subject alternative name (IP addresses as IPs),
so an edge connecting to any of them verifies it; an edge certificate's common name is the edge
id, which is what the cloud's credentials file (``cert_cn``) and the mutual-TLS identity check use.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """Paths of what :func:`make_certs` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    edges: dict[str, tuple[Path, Path]]  # edge id -> (certificate, key)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedshift test bed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, ca_key: ec.EllipticCurvePrivateKey,
           days: int, *, server_hosts: Sequence[str] = (), is_ca: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(ca_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server_hosts:
            builder = builder.add_extension(_san(server_hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_certs(out: str | os.PathLike, hosts: Sequence[str], edges: Sequence[str] = (), days: int = 30) -> Issued:
    """Write a CA, a server certificate for ``hosts`` and a client certificate per edge into ``out``."""
    if not hosts:
        raise ValueError("give at least one host for the server certificate (e.g. 127.0.0.1,localhost)")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    for edge in edges:
        if not edge or "/" in edge or edge.startswith("."):
            raise ValueError(f"bad edge id for a file name: {edge!r}")
    out = Path(out)
    (out / "edges").mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedshift test CA")
    ca = _issue("fedshift test CA", ca_key, ca_name, ca_key, days, is_ca=True)
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(hosts[0], server_key, ca_name, ca_key, days, server_hosts=hosts)
    (out / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "server.key", server_key)
    issued: dict[str, tuple[Path, Path]] = {}
    for edge in edges:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(edge, key, ca_name, ca_key, days)
        cert_path, key_path = out / "edges" / f"{edge}.pem", out / "edges" / f"{edge}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        issued[edge] = (cert_path, key_path)
    return Issued(out / "ca.pem", out / "server.pem", out / "server.key", issued)
