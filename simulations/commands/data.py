"""``fedshift data``: look at the built-in data before training on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.data.builtin import BUILTIN_DATASETS as DATASETS


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prev = sub.add_parser("preview", help="PNG grid of a built-in benchmark's domains (one row per client)")
    prev.add_argument("--out", type=Path, required=True, help="PNG file to write")
    _dataset_flags(prev)
    prev.add_argument("--clients-per-domain", type=int, default=1, help="clients per domain style (default: 1)")
    prev.add_argument("--per-client", type=int, default=10, help="samples shown per client (one per class first)")
    corr = sub.add_parser("corruptions", help="PNG grid of the 15 corruptions x 5 severities")
    corr.add_argument("--out", type=Path, required=True, help="PNG file to write")
    _dataset_flags(corr)
    corr.add_argument("--domain", default="mnistm", help="domain of the sample images")
    corr.add_argument("--samples", type=int, default=2, help="sample images per row (default: 2)")


def _dataset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default="digits-shift", help="built-in benchmark (default: "
                   "digits-shift)")
    p.add_argument("--classes", type=int, default=10, choices=(10, 47, 100),
                   help="glyph-shift class set (digits-shift always has 10)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    p.add_argument("--image-size", type=int, default=32, help="pixels (default: 32)")


def _load(args: argparse.Namespace, domains: tuple[str, ...] | None = None, clients_per_domain: int = 1):
    from core.data import DOMAINS, make_digits_shift, make_glyph_shift

    domains = domains or DOMAINS
    if args.dataset == "glyph-shift":
        # a few images per class are enough to look at; too small to be worth a disk cache
        return make_glyph_shift(seed=args.seed, classes=args.classes, image_size=args.image_size,
                                clients_per_domain=clients_per_domain, train_per_client=2 * args.classes,
                                val_per_client=0, test_per_client=args.classes, domains=domains,
                                cache=False)
    if args.classes != 10:
        raise SystemExit("fedshift data: --classes applies to --dataset glyph-shift only")
    return make_digits_shift(seed=args.seed, image_size=args.image_size, domains=domains,
                             clients_per_domain=clients_per_domain)


def run(args: argparse.Namespace) -> int:
    from core.data import save_corruption_preview, save_preview

    if args.data_command == "preview":
        data = _load(args, clients_per_domain=args.clients_per_domain)
        save_preview(data, args.out, per_client=args.per_client)
    else:
        data = _load(args, domains=(args.domain,))
        save_corruption_preview(data.clients[0].test.images[: args.samples], args.out, seed=args.seed)
    return 0
