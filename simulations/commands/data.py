"""``fedshift data``: look at the built-in data before training on it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from core.data.builtin import BuiltinData
from core.data.types import FederatedDataset
from protos.config import add_config_flags, option, resolve_or_print, same_as
from simulations.fl_role import FLRun


@dataclass(frozen=True)
class PreviewData:
    """What a preview draws. The benchmark's own settings (choices, help, defaults) are
    :class:`BuiltinData`'s, mirrored with ``same_as`` rather than retyped here."""

    dataset: str = same_as(BuiltinData, "dataset")
    classes: int = same_as(BuiltinData, "classes")
    seed: int = option(0, "data seed")
    image_size: int = option(32, "image side in pixels")

    def __post_init__(self) -> None:
        BuiltinData(self.dataset, self.classes)  # the benchmark's own rules (digits-shift: 10 classes)


def sizes_table(data: FederatedDataset) -> str:
    """One Markdown row per client: its domain, its split sizes and how many classes each holds."""
    lines = ["| client | domain | train | val | test | classes in train / val / test |",
             "|---|---|---|---|---|---|"]
    for c in data.clients:
        present = " / ".join(str(len(set(s.labels.tolist()))) for s in (c.train, c.val, c.test))
        lines.append(f"| {c.client_id} | {c.domain} | {len(c.train)} | {len(c.val)} | {len(c.test)} | {present} |")
    return "\n".join(lines) + "\n"


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prev = sub.add_parser("preview", help="PNG grid of a built-in benchmark's domains (one row per client)")
    prev.add_argument("--out", type=Path, help="PNG file to write (required unless --print-config)")
    prev.add_argument("--clients-per-domain", type=int, default=1, help="clients per domain style (default: 1)")
    prev.add_argument("--per-client", type=int, default=10, help="samples shown per client (one per class first)")
    add_config_flags(prev, PreviewData, title="data")
    corr = sub.add_parser("corruptions", help="PNG grid of the 15 corruptions x 5 severities")
    corr.add_argument("--out", type=Path, help="PNG file to write (required unless --print-config)")
    corr.add_argument("--domain", default="mnistm", help="domain of the sample images")
    corr.add_argument("--samples", type=int, default=2, help="sample images per row (default: 2)")
    add_config_flags(corr, PreviewData, title="data")
    size = sub.add_parser("sizes", help="the train / val / test images of each client, as the FL clients get "
                          "them: takes `fedshift fl`'s flags and --config (a run's fl.toml)")
    add_config_flags(size, FLRun, title="FL run")


def _load(cfg: PreviewData, domains: tuple[str, ...] | None = None, clients_per_domain: int = 1):
    from core.data import DOMAINS, make_digits_shift, make_glyph_shift

    domains = domains or DOMAINS
    if cfg.dataset == "glyph-shift":
        # a few images per class are enough to look at; too small to be worth a disk cache
        return make_glyph_shift(seed=cfg.seed, classes=cfg.classes, image_size=cfg.image_size,
                                clients_per_domain=clients_per_domain, train_per_client=2 * cfg.classes,
                                val_per_client=0, test_per_client=cfg.classes, domains=domains,
                                cache=False)
    return make_digits_shift(seed=cfg.seed, image_size=cfg.image_size, domains=domains,
                             clients_per_domain=clients_per_domain)


def run(args: argparse.Namespace) -> int:
    from core.data import save_corruption_preview, save_preview

    if args.data_command == "sizes":
        run_cfg = resolve_or_print(FLRun, args)
        if run_cfg is not None:  # the FL clients' own dataset (client/app.py::client_data)
            print(sizes_table(run_cfg.fl.make_data()), end="")
        return 0
    cfg = resolve_or_print(PreviewData, args)
    if cfg is None:
        return 0
    if args.out is None:
        raise ValueError("--out FILE is required")
    if args.data_command == "preview":
        data = _load(cfg, clients_per_domain=args.clients_per_domain)
        save_preview(data, args.out, per_client=args.per_client)
    else:
        data = _load(cfg, domains=(args.domain,))
        save_corruption_preview(data.clients[0].test.images[: args.samples], args.out, seed=cfg.seed)
    return 0
