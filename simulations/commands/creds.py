"""``fedshift creds``: edit the cloud's per-edge credentials file (thin: see :mod:`server.auth`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = ("Edit a per-edge credentials file (the cloud's --credentials; it re-reads the file when it "
                     "changes). `add` prints the edge's new token once: give it to that edge (--token or "
                     "$FEDSHIFT_TOKEN); the file keeps only a salted hash.")
    p.add_argument("action", choices=("add", "revoke", "list"))
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("edge", nargs="?", metavar="EDGE_ID")
    p.add_argument("--cert-cn", default="", help="add: the edge's client-certificate common name (mutual TLS)")


def run(args: argparse.Namespace) -> int:
    from server.auth import add_edge, parse_credentials, revoke_edge

    if args.action == "list":
        for e in parse_credentials(args.file.read_text(), str(args.file)).values():
            print(f"{e.edge_id}\t{'revoked' if e.revoked else 'active'}\t"
                  f"{'token' if e.token_sha256 else '-'}\t{e.cert_cn or '-'}")
        return 0
    if not args.edge:
        raise ValueError(f"creds {args.action} needs an EDGE_ID")
    if args.action == "add":
        print(add_edge(args.file, args.edge, args.cert_cn))
        log.info("edge %s added to %s (its token is printed above, and nowhere else)", args.edge, args.file)
    else:
        revoke_edge(args.file, args.edge)
        log.info("edge %s revoked in %s", args.edge, args.file)
    return 0
