"""``fedshift run [SCENARIO] [--set key=value ...] [--out DIR] [--from STAGE]``: the whole system."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", default="default",
                   help="built-in scenario name (default, tiny) or a .toml file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any scenario key, e.g. --set fl.rounds=10 (repeatable)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<scenario>-<time>)")
    p.add_argument("--from", dest="start", default="data",
                   help="re-run from this stage on an existing run folder: data, fl, export, adapt, report")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved scenario as TOML and exit (save it, edit it, run it as a file)")


def run(args: argparse.Namespace) -> int:
    from simulations.pipeline import Pipeline
    from simulations.scenario import load_scenario

    scenario = load_scenario(args.scenario, args.overrides)
    if args.print_config:
        from simulations.scenario import to_toml

        print(to_toml(scenario), end="")
        return 0
    if args.start != "data" and args.out is None:
        raise ValueError("--from needs --out pointing at an existing run folder")
    out = args.out or Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    pipeline = Pipeline(scenario, out)
    t0 = time.monotonic()
    try:
        timings = pipeline.run(args.start)
    except KeyboardInterrupt:
        log.warning("interrupted: every process this run started has been stopped; partial results in %s", out)
        return 130
    log.info("finished in %.0f s (%s)", time.monotonic() - t0,
             ", ".join(f"{k} {v.seconds:.0f} s" for k, v in timings.items()))
    print(f"\nreport:      {out / 'report.md'}\nresults:     {out / 'results.json'}\n"
          f"TensorBoard: tensorboard --logdir {out}")
    return 0
