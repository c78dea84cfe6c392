"""``fedshift certs``: a test CA, a server certificate and edge client certificates (thin: see
:mod:`server.certs`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = ("Write a local CA, a server certificate for --hosts and one client certificate per "
                     "--edges id into DIR (for a test bed: the CA key sits beside them).")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--hosts", type=_csv, required=True, help="the cloud's names and addresses, comma-separated "
                   "(e.g. 127.0.0.1,localhost,cloud.lan)")
    p.add_argument("--edges", type=_csv, default=[], help="edge ids to issue client certificates for (mutual TLS)")
    p.add_argument("--days", type=int, default=30, help="validity in days")


def run(args: argparse.Namespace) -> int:
    from server.certs import make_certs

    issued = make_certs(args.dir, args.hosts, args.edges, args.days)
    print(f"CA          {issued.ca}\nserver cert {issued.server_cert}\nserver key  {issued.server_key}")
    for edge, (cert, key) in issued.edges.items():
        print(f"edge {edge}: {cert} {key}")
    print(f"\nfedshift cloud --tls-cert {issued.server_cert} --tls-key {issued.server_key}"
          + (f" --tls-client-ca {issued.ca}" if issued.edges else ""))
    return 0
