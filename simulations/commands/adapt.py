"""``fedshift adapt``: cloud + N edge processes on loopback for one method, or a comparison."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="cema", help="no_adapt, bn_stats, tent, eata, distill_all, cema, random, "
                   "cema_no_replay, cema_static, cema_no_emin")
    p.add_argument("--compare", action="store_true", help="run --methods over --seeds and write compare.md/png")
    p.add_argument("--methods", nargs="+", help="with --compare (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --compare")
    p.add_argument("--edges", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--corruptions", nargs="+", help="default: all 15")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--protocol", choices=("reset", "continual"), default="reset")
    p.add_argument("--passes", type=int, default=1, help="passes over the test images per corruption")
    p.add_argument("--limit", type=int, help="cap samples per edge (quick runs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sync", type=float, default=2.0, help="edge lockstep bound, seconds (0: free-running)")
    p.add_argument("--random-rate", type=float, help="method random: keep probability")
    p.add_argument("--redundancy", type=float, help="edge redundancy threshold d (default: off; eata 0.5)")
    p.add_argument("--edge-weights", help="edge model weights (default: the built-in edge model)")
    p.add_argument("--teacher-weights", help="teacher weights (default: the built-in teacher)")
    p.add_argument("--cache", help="cache folder of the built-in models")
    p.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from core.corruptions import CORRUPTIONS
    from simulations.adapt import AdaptConfig, run_adapt

    cfg = AdaptConfig(method=args.method, edges=args.edges, corruptions=tuple(args.corruptions or CORRUPTIONS),
                      severity=args.severity, protocol=args.protocol, passes=args.passes, limit=args.limit,
                      batch_size=args.batch_size, seed=args.seed, sync_s=args.sync, random_rate=args.random_rate,
                      redundancy=args.redundancy, edge_weights=args.edge_weights,
                      teacher_weights=args.teacher_weights, cache=args.cache, threads=args.threads)
    if args.compare:
        from simulations.adapt_compare import DEFAULT_METHODS, compare

        compare(cfg, tuple(args.methods or DEFAULT_METHODS), args.seeds, args.out)
        print((args.out / "compare.md").read_text())
    else:
        run_adapt(cfg, args.out)
    return 0
