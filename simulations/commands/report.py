"""``fedshift report RUN_DIR``: rebuild report.md and its plots from a run folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a folder written by `fedshift run`")


def run(args: argparse.Namespace) -> int:
    from simulations.report import write_report

    print(write_report(args.run_dir))
    return 0
