"""``fedshift data``: look at the built-in data before training on it."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prev = sub.add_parser("preview", help="PNG grid of the digits-shift domains (one row per client)")
    prev.add_argument("--out", type=Path, required=True, help="PNG file to write")
    prev.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    prev.add_argument("--image-size", type=int, default=32, help="pixels (default: 32)")
    prev.add_argument("--clients-per-domain", type=int, default=1, help="clients per domain style (default: 1)")
    corr = sub.add_parser("corruptions", help="PNG grid of the 15 corruptions x 5 severities")
    corr.add_argument("--out", type=Path, required=True, help="PNG file to write")
    corr.add_argument("--seed", type=int, default=0, help="data and corruption seed (default: 0)")
    corr.add_argument("--image-size", type=int, default=32, help="pixels (default: 32)")
    corr.add_argument("--domain", default="mnistm", help="digits-shift domain of the sample images")
    corr.add_argument("--samples", type=int, default=2, help="sample images per row (default: 2)")


def run(args: argparse.Namespace) -> int:
    from core.data import make_digits_shift, save_corruption_preview, save_preview

    if args.data_command == "preview":
        data = make_digits_shift(seed=args.seed, image_size=args.image_size,
                                 clients_per_domain=args.clients_per_domain)
        save_preview(data, args.out)
    else:
        data = make_digits_shift(seed=args.seed, image_size=args.image_size, domains=(args.domain,))
        save_corruption_preview(data.clients[0].test.images[: args.samples], args.out, seed=args.seed)
    return 0
