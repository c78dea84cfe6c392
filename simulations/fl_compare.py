"""``fedshift fl compare``: every strategy × every seed, then one table and one plot.

Each run is a separate ``fedshift fl`` process (Ray starts and stops cleanly per run, and a crash
of one run cannot poison the others); its output goes to ``<run dir>/run.log``. A run whose
results.json already exists with the same settings is reused, so an interrupted comparison
resumes where it stopped (``--force`` reruns everything).

Outputs in DIR: ``comparison.md`` (mean ± std per domain and overall, paired per-seed
differences FRAug − FedBN and FedBN − FedAvg), ``comparison.json``, ``accuracy_vs_round.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

NAMES = {"local": "local-only", "fedavg": "FedAvg", "fedprox": "FedProx", "fedbn": "FedBN", "fraug": "FRAug"}
PAIRS = (("fraug", "fedbn"), ("fedbn", "fedavg"), ("fedbn", "local"))


def _run_args(args: argparse.Namespace, strategy: str, seed: int, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "simulations.cli", "fl", "--strategy", strategy, "--seed", str(seed),
           "--out", str(out), "--cpus-per-client", str(args.cpus_per_client)]
    if args.rounds is not None:
        cmd += ["--rounds", str(args.rounds)]
    if args.clients is not None:
        cmd += ["--clients", str(args.clients)]
    if args.num_cpus is not None:
        cmd += ["--num-cpus", str(args.num_cpus)]
    for item in args.sets or []:
        cmd += ["--set", item]
    return cmd


def _reusable(results_path: Path, expected: dict[str, Any]) -> bool:
    if not results_path.is_file():
        return False
    try:
        results = json.loads(results_path.read_text())
    except json.JSONDecodeError:
        return False
    done = len(results.get("history", [])) == results.get("rounds")
    return done and results.get("config") == expected


def _run_one(cmd: list[str], log_path: Path) -> None:
    """Run one ``fedshift fl`` child; stop it (by PID) if we are interrupted."""
    with log_path.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"run failed (exit {rc}): {shlex.join(cmd)}\n--- {log_path} (tail) ---\n{tail}")


def run_comparison(args: argparse.Namespace, out: Path) -> Path:
    """Run (or reuse) every strategy × seed; write the table and plot; return the table's path."""
    from simulations.commands.fl import overrides_from_args

    from core.fl_config import FLConfig

    out.mkdir(parents=True, exist_ok=True)
    plan = [(s, k) for k in args.seeds for s in args.strategies]
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, (strategy, seed) in enumerate(plan, 1):
        run_dir = out / f"{strategy}-seed{seed}"
        expected = FLConfig.from_run_config(overrides_from_args(args, strategy=strategy, seed=seed,
                                                                out=run_dir)).to_run_config()
        if not args.force and _reusable(run_dir / "results.json", expected):
            log.info("[%d/%d] %s seed %d: reusing %s", i, len(plan), strategy, seed, run_dir)
        else:
            t = time.perf_counter()
            log.info("[%d/%d] %s seed %d: running (log: %s)", i, len(plan), strategy, seed, run_dir / "run.log")
            run_dir.mkdir(parents=True, exist_ok=True)
            _run_one(_run_args(args, strategy, seed, run_dir), run_dir / "run.log")
            log.info("[%d/%d] %s seed %d: done in %.0f s", i, len(plan), strategy, seed, time.perf_counter() - t)
        res = json.loads((run_dir / "results.json").read_text())
        log.info("[%d/%d] %s seed %d: mean accuracy %.4f (val %.4f)", i, len(plan), strategy, seed,
                 res["mean_accuracy"], res["mean_val_accuracy"])
        results.append(res)
    command = "fedshift fl compare " + shlex.join(sys.argv[sys.argv.index("compare") + 1:]) \
        if "compare" in sys.argv else "fedshift fl compare"
    summary = summarize(results)
    summary["command"] = command
    summary["wall_seconds"] = time.perf_counter() - t0
    (out / "comparison.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = out / "comparison.md"
    table.write_text(markdown_table(summary))
    plot_accuracy(results, out / "accuracy_vs_round.png")
    log.info("wrote %s, %s and %s (%.0f s)", table, out / "comparison.json", out / "accuracy_vs_round.png",
             summary["wall_seconds"])
    return table


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy: per-domain and mean accuracy over seeds; paired per-seed differences."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["strategy"], {})[int(r["seed"])] = r
    strategies = [s for s in NAMES if s in by] + sorted(set(by) - set(NAMES))
    domains = list(next(iter(results))["per_client_accuracy"]) if results else []
    table: dict[str, Any] = {}
    for s in strategies:
        runs = by[s]
        row = {d: _mean_std([runs[k]["per_client_accuracy"][d] for k in sorted(runs)]) for d in domains}
        row["mean"] = _mean_std([runs[k]["mean_accuracy"] for k in sorted(runs)])
        row["val_mean"] = _mean_std([runs[k]["mean_val_accuracy"] for k in sorted(runs)])
        table[s] = {"seeds": sorted(runs), **row}
    pairs: dict[str, Any] = {}
    for a, b in PAIRS:
        if a in by and b in by:
            seeds = sorted(set(by[a]) & set(by[b]))
            diffs = [by[a][k]["mean_accuracy"] - by[b][k]["mean_accuracy"] for k in seeds]
            val_diffs = [by[a][k]["mean_val_accuracy"] - by[b][k]["mean_val_accuracy"] for k in seeds]
            pairs[f"{a}-{b}"] = {"seeds": seeds, "test": diffs, "test_mean_std": _mean_std(diffs),
                                 "val": val_diffs, "val_mean_std": _mean_std(val_diffs)}
    first = next(iter(results))["config"] if results else {}
    return {"strategies": strategies, "domains": domains, "table": table, "paired": pairs, "config": first}


def markdown_table(summary: dict[str, Any]) -> str:
    """The Markdown report: accuracy (%) mean ± std over seeds, then paired differences."""
    doms = summary["domains"]

    def cell(ms: Sequence[float]) -> str:
        return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"

    seeds = sorted({k for row in summary["table"].values() for k in row["seeds"]})
    lines = [f"Test accuracy (%) per client domain, mean ± std over seeds {', '.join(map(str, seeds))}; "
             "final round; each client's model (with its local layers) on its own test split.", "",
             "| method | " + " | ".join(doms) + " | **mean** | val mean |",
             "|---|" + "---|" * (len(doms) + 2)]
    for s in summary["strategies"]:
        row = summary["table"][s]
        lines.append(f"| {NAMES.get(s, s)} | " + " | ".join(cell(row[d]) for d in doms)
                     + f" | **{cell(row['mean'])}** | {cell(row['val_mean'])} |")
    if summary["paired"]:
        lines += ["", "Paired per-seed differences of mean accuracy (percentage points):", "",
                  "| difference | per seed (test) | test mean ± std | val mean ± std |", "|---|---|---|---|"]
        for key, p in summary["paired"].items():
            a, b = key.split("-")
            per = ", ".join(f"{100 * d:+.1f}" for d in p["test"])
            lines.append(f"| {NAMES.get(a, a)} − {NAMES.get(b, b)} | {per} | "
                         f"{100 * p['test_mean_std'][0]:+.1f} ± {100 * p['test_mean_std'][1]:.1f} | "
                         f"{100 * p['val_mean_std'][0]:+.1f} ± {100 * p['val_mean_std'][1]:.1f} |")
    cfg = summary.get("config") or {}
    keep = ("rounds", "clients", "image-size", "train-per-client", "model", "model-width", "local-epochs",
            "local-steps", "batch-size", "lr", "momentum", "proximal-mu")
    lines += ["", "Settings: " + ", ".join(f"{k}={cfg[k]}" for k in keep if k in cfg) + "."]
    if summary.get("command"):
        lines += ["", f"Command: `{summary['command']}`"]
    return "\n".join(lines) + "\n"


def plot_accuracy(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Mean client test accuracy vs round per strategy (mean over seeds, band = ±1 std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[list[float]]] = {}
    for r in results:
        by.setdefault(r["strategy"], []).append([h["mean_accuracy"] for h in r["history"]])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in [s for s in NAMES if s in by]:
        n = min(len(c) for c in by[s])
        curves = np.array([c[:n] for c in by[s]]) * 100
        rounds = np.arange(1, n + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(rounds, mean, label=NAMES[s])
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("mean client test accuracy (%)")
    ax.set_title("digits-shift: accuracy vs round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
