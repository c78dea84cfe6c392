"""``fedshift fl``: federated training on digits-shift in Flower's simulation engine.

This module only parses the command line into an :class:`~simulations.fl_role.FLRun` and calls
:func:`~simulations.fl_sim.run_fl_simulation` or :func:`~simulations.fl_compare.run_comparison`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import get_type_hints

from core.fl_config import REPORTS, STRATEGIES, FLConfig
from protos.config import add_config_flags, coerce, resolve
from simulations.fl_role import FLRun

log = logging.getLogger(__name__)

DESCRIPTION = """\
Federated training on digits-shift (one image domain per client) with Flower's simulation engine.

  fedshift fl --strategy fedbn --seed 0 --rounds 30 --clients 5 --out runs/fedbn
      one run: results.json, checkpoint.pt, TensorBoard events and fl.toml (its settings) in the
      output folder
  fedshift fl compare --seeds 0 1 2 --out runs/fl-compare
      every strategy for every seed, then comparison.md (mean ± std, paired differences) and an
      accuracy-vs-round plot; finished runs are reused when the comparison is started again
  fedshift fl --print-config > fl.toml;  fedshift fl --config fl.toml --rounds 5
      settings from a file; any flag given overrides the file
"""

_COMPARE_ONLY = ("seeds", "strategies", "force", "report")
_SINGLE_RUN_ONLY = ("strategy", "seed", "out_dir", "resume")  # compare sets these per run


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("mode", nargs="?", choices=("run", "compare"), default="run",
                   help="run: one experiment (the default); compare: every strategy over several seeds")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="run: the output folder (same as --out-dir); compare: the folder for all runs, "
                        "the table and the plot (required)")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                   help="set a setting by its Flower run-config name, e.g. --set model-width=0.5 (repeatable)")
    add_config_flags(p, FLRun)
    cmp = p.add_argument_group("compare")
    cmp.add_argument("--seeds", type=int, nargs="+", metavar="N", help="seeds to run (default: 0 1 2)")
    cmp.add_argument("--strategies", nargs="+", choices=STRATEGIES, metavar="STRATEGY",
                     help=f"strategies to run (default: all of {', '.join(STRATEGIES)})")
    cmp.add_argument("--force", action="store_true", default=None,
                     help="rerun runs whose results are already there")
    cmp.add_argument("--report", choices=REPORTS, default=None,
                     help="which accuracy the table reports: final (the last round, the default) or best_val "
                          "(each client's test accuracy at its best-validation round, as the FedBN/FRAug papers)")


def _given(args: argparse.Namespace, field: str) -> bool:
    return hasattr(args, f"cfg:fl.{field}")


def _apply_sets(args: argparse.Namespace) -> None:
    """``--set key=value`` (run-config spelling) as if the field's own flag had been given."""
    hints = get_type_hints(FLConfig)
    keys = FLConfig.keys()
    for item in args.sets or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in keys:
            raise ValueError(f"--set: unknown key {key!r}; valid keys: {', '.join(keys)}")
        field = key.replace("-", "_")
        if _given(args, field):
            raise ValueError(f"--set {key} repeats a setting already given on the command line")
        setattr(args, f"cfg:fl.{field}", coerce(value.strip(), hints[field], f"--set {key}", text=True))


def run_settings(args: argparse.Namespace) -> FLRun:
    """The settings a command line describes: defaults < --config FILE < --set < flags."""
    if args.mode == "run":
        for name in _COMPARE_ONLY:
            if getattr(args, name) is not None:
                raise ValueError(f"--{name} is for `fedshift fl compare`")
        if args.out is not None:
            if _given(args, "out_dir"):
                raise ValueError("give --out or --out-dir, not both")
            setattr(args, "cfg:fl.out_dir", str(args.out))
    _apply_sets(args)
    if args.mode == "compare":
        given = [f for f in _SINGLE_RUN_ONLY if _given(args, f)]
        if given:
            raise ValueError(f"compare sets {', '.join(given)} for each run itself; use --strategies, --seeds "
                             "and --out")
    return resolve(FLRun, args)


def run(args: argparse.Namespace) -> int:
    settings = run_settings(args)
    if args.print_config:
        print(settings.to_toml(), end="")
        return 0
    if args.mode == "compare":
        from simulations.fl_compare import run_comparison

        if args.out is None:
            raise ValueError("compare needs --out DIR")
        if settings.fl.resume:
            raise ValueError("compare cannot resume from one checkpoint; start it again to reuse finished runs")
        table = run_comparison(settings, strategies=args.strategies or list(STRATEGIES),
                               seeds=args.seeds or [0, 1, 2], out=args.out, force=bool(args.force),
                               report=args.report or "final")
        log.info("comparison table: %s", table)
        return 0

    from simulations.fl_sim import run_fl_simulation

    result = run_fl_simulation(settings, verbose=getattr(args, "verbose", False))
    per_client = ", ".join(f"{k} {v:.3f}" for k, v in result.per_client_accuracy.items() if v is not None)
    mean = f"{result.mean_accuracy:.4f}" if result.mean_accuracy is not None else "n/a"
    log.info("%s seed %d: mean accuracy %s (%s)", result.strategy, result.seed, mean, per_client)
    return 0
