"""``fedshift fl``: federated training on digits-shift in Flower's simulation engine.

``fedshift fl --strategy fedbn --seed 0 --rounds 30 --clients 5 --out runs/fedbn`` runs one
experiment; ``fedshift fl compare --seeds 0 1 2 --out DIR`` runs local-only, FedAvg, FedProx,
FedBN and FRAug for each seed and writes a Markdown table and an accuracy-vs-round plot.
Any run-config key (see pyproject's ``[tool.flwr.app.config]``) can be set with ``--set k=v``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STRATEGY_CHOICES = ("local", "fedavg", "fedprox", "fedbn", "fraug")


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", nargs="?", choices=("run", "compare"), default="run",
                   help="run one experiment (default) or compare all strategies over seeds")
    p.add_argument("--strategy", choices=STRATEGY_CHOICES, default="fedavg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="compare: seeds")
    p.add_argument("--strategies", nargs="+", choices=STRATEGY_CHOICES, default=list(STRATEGY_CHOICES),
                   help="compare: strategies")
    p.add_argument("--rounds", type=int, help="federated rounds (default: run config)")
    p.add_argument("--clients", type=int, help="clients, one digits-shift domain each (<=5 or a multiple of 5)")
    p.add_argument("--out", type=Path, help="output directory (default runs/fl-<strategy>-seed<seed>)")
    p.add_argument("--resume", type=Path, help="checkpoint (or run directory) to resume from")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                   help="any run-config key, e.g. --set model-width=0.5 (repeatable)")
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: min(cores, clients))")
    p.add_argument("--cpus-per-client", type=int, default=1,
                   help="Ray CPUs per simulated client (1: one client per core in parallel)")
    p.add_argument("--force", action="store_true", help="compare: rerun runs that already have results")


def overrides_from_args(args: argparse.Namespace, *, strategy: str, seed: int, out: Path | None) -> dict[str, Any]:
    """The run-config overrides a command line describes (validated by FLConfig)."""
    from core.fl_config import FLConfig

    ov: dict[str, Any] = {**_parse_sets(args.sets), "strategy": strategy, "seed": seed}
    if args.rounds is not None:
        ov["rounds"] = args.rounds
    if args.clients is not None:
        ov["clients"] = args.clients
    if out is not None:
        ov["out-dir"] = str(out)
    if getattr(args, "resume", None) is not None:
        ov["resume"] = str(args.resume)
    FLConfig.from_run_config(ov)  # fail fast, before anything starts
    return ov


def run(args: argparse.Namespace) -> int:
    if args.mode == "compare":
        from simulations.fl_compare import run_comparison

        if args.out is None:
            raise ValueError("compare needs --out DIR")
        report = run_comparison(args, args.out)
        log.info("comparison table: %s", report)
        return 0

    from simulations.fl_sim import run_fl_simulation

    overrides = overrides_from_args(args, strategy=args.strategy, seed=args.seed, out=args.out)
    results = run_fl_simulation(overrides, num_cpus=args.num_cpus, cpus_per_client=args.cpus_per_client,
                                verbose=getattr(args, "verbose", False))
    per_client = ", ".join(f"{k} {v:.3f}" for k, v in results["per_client_accuracy"].items() if v is not None)
    log.info("%s seed %d: mean accuracy %.4f (%s)", results["strategy"], results["seed"],
             results["mean_accuracy"], per_client)
    return 0
