"""Which data should the default scenario run on? Candidates inside the 5-minute budget, measured.

    python benchmarks/default_choice.py                    # every (candidate, seed) cell, resumable

Each cell is one `fedshift run` of the default scenario with the candidate's data overrides and a
seed, from an EMPTY model cache (so its wall time includes training the built-in teacher, as a new
user's first run does). One JSON per finished cell in ``--out-dir``; cells already there are
skipped. The summary gives, per candidate, the wall time and the paired per-seed differences
CEMA − edge BN statistics (the cloud's contribution) and FedBN − FRAug (the FL stage's spread).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CANDIDATES: dict[str, tuple[str, ...]] = {
    "digits-shift": (),
    "glyph-shift-100-small": ("data.dataset=glyph-shift", "data.classes=100", "data.train_per_client=600",
                              "data.val_per_client=100", "data.test_per_client=300"),
    # the same, trimmed to fit the budget with room: the default scenario's data
    "glyph-shift-100-default": ("data.dataset=glyph-shift", "data.classes=100", "data.train_per_client=500",
                                "data.val_per_client=100", "data.test_per_client=250"),
}
log = logging.getLogger("bench.default_choice")


def run_cell(name: str, seed: int, runs: Path) -> dict:
    """One `fedshift run` (default scenario + the candidate's overrides) from an empty cache."""
    from simulations.results import RunResults

    out = runs / f"{name}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="fedshift-cache-") as cache:
        sets = [*CANDIDATES[name], f"seed={seed}", f"resources.cache={cache}"]
        cmd = [sys.executable, "-m", "simulations.cli", "run", "--out", str(out),
               *[x for s in sets for x in ("--set", s)]]
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    r = RunResults.read(out / "results.json")
    assert r.adapt is not None and r.adapt.bn_stats_accuracy is not None
    return {"candidate": name, "seed": seed, "wall_s": round(wall, 1), "command": " ".join(cmd[1:]),
            "stages_s": {k: v.seconds for k, v in r.stages.items()},
            "fl_mean_accuracy": {k: v.mean_accuracy for k, v in r.fl.items()},
            "no_adapt": r.adapt.no_adapt_accuracy.overall, "bn_stats": r.adapt.bn_stats_accuracy.overall,
            "cema": r.adapt.accuracy.overall, "upload_rate": r.adapt.upload_rate}


def _pm(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:+.1f}" if len(values) < 2 else f"{mean:+.1f} ± {100 * statistics.stdev(values):.1f}"


def summary(cells: list[dict]) -> str:
    lines = ["| candidate | seeds | wall s (max) | no adapt | BN stats | CEMA | CEMA − BN stats (paired) | "
             "per seed | FedBN − FRAug (paired) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in CANDIDATES:
        cs = sorted((c for c in cells if c["candidate"] == name), key=lambda c: c["seed"])
        if not cs:
            continue
        gain = [c["cema"] - c["bn_stats"] for c in cs]
        fl = [c["fl_mean_accuracy"]["fedbn"] - c["fl_mean_accuracy"]["fraug"] for c in cs]
        mean = lambda k: f"{100 * statistics.fmean(c[k] for c in cs):.1f}"  # noqa: E731
        lines.append(f"| {name} | {len(cs)} | {max(c['wall_s'] for c in cs):.0f} | {mean('no_adapt')} | "
                     f"{mean('bn_stats')} | {mean('cema')} | {_pm(gain)} | "
                     f"{', '.join(f'{100 * g:+.1f}' for g in gain)} | {_pm(fl)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/default_choice"))
    parser.add_argument("--runs", type=Path, default=Path("runs/default_choice"), help="run folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for name in args.candidates:
            path = args.out_dir / f"{name}-seed{seed}.json"
            if path.is_file():
                log.info("%s: done already, skipped", path.name)
                continue
            log.info("cell %s seed %d …", name, seed)
            cell = run_cell(name, seed, args.runs)
            log.info("%s seed %d: %.0f s, CEMA %.1f%%, BN stats %.1f%%", name, seed, cell["wall_s"],
                     100 * cell["cema"], 100 * cell["bn_stats"])
            path.write_text(json.dumps(cell, indent=1))
    cells = [json.loads(p.read_text()) for p in sorted(args.out_dir.glob("*-seed*.json"))]
    table = summary(cells)
    (args.out_dir / "summary.md").write_text("Command: `python benchmarks/default_choice.py`\n\n" + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
