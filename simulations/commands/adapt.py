"""``fedshift adapt``: cloud + N edge processes on loopback for one method, or a comparison."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = ("Adapt the edge model on corrupted streams: one cloud process and N forward-only edge "
               "processes on loopback gRPC, for one method or (--compare) several over seeds. Settings: "
               "--config FILE and/or the flags below (flags win; --edge-* set every edge, --cloud-* the "
               "cloud); --print-config shows the result. Each child's resolved config is written to "
               "OUT/configs/.")


def configure(p: argparse.ArgumentParser) -> None:
    from simulations.adapt import AdaptConfig
    from protos.config import add_config_flags

    p.description = DESCRIPTION
    p.add_argument("--out", type=Path, help="run folder (required unless --print-config)")
    p.add_argument("--compare", action="store_true", help="run --methods over --seeds and write compare.md/png")
    p.add_argument("--methods", nargs="+", help="with --compare (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --compare")
    add_config_flags(p, AdaptConfig, title="adapt")


def run(args: argparse.Namespace) -> int:
    from protos.config import resolve_or_print
    from simulations.adapt import AdaptConfig, run_adapt

    cfg = resolve_or_print(AdaptConfig, args)
    if cfg is None:
        return 0
    if args.out is None:
        raise ValueError("--out DIR is required")
    if args.compare:
        from simulations.adapt_compare import DEFAULT_METHODS, compare

        compare(cfg, tuple(args.methods or DEFAULT_METHODS), args.seeds, args.out)
        print((args.out / "compare.md").read_text())
    else:
        run_adapt(cfg, args.out)
    return 0
