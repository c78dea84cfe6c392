"""``fedshift fl compare``: every strategy × every seed, then one table and one plot.

Each run is a separate ``fedshift fl --config <run dir>/fl.toml`` process (Ray starts and stops
cleanly per run, and a crash of one run cannot poison the others); its output goes to
``<run dir>/run.log`` and its summary to ``<run dir>/results.json`` (an
:class:`~core.fl_config.FLResult`). A run whose complete results.json already holds the same
settings is reused, so an interrupted comparison resumes where it stopped (``force`` reruns
everything).

Outputs in DIR: ``fl.toml`` (the shared settings), ``comparison.md`` (mean ± std per domain and
overall, paired per-seed differences FRAug − FedBN and FedBN − FedAvg), ``comparison.json``,
``accuracy_vs_round.png``.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from core.fl_config import FLResult, Report
from simulations.fl_role import ROLE_FILE, FLRun
from simulations.processes import ProcessGroup

log = logging.getLogger(__name__)

NAMES = {"local": "local-only", "fedavg": "FedAvg", "fedprox": "FedProx", "fedbn": "FedBN", "fraug": "FRAug"}
PAIRS = (("fraug", "fedbn"), ("fedbn", "fedavg"), ("fedbn", "local"))


def _reusable(results_path: Path, run: FLRun) -> bool:
    """A complete results.json of exactly these settings is already there."""
    if not results_path.is_file():
        return False
    try:
        done = FLResult.read(results_path)
    except ValueError as exc:
        log.info("rerunning: %s", exc)
        return False
    return done.complete and done.config == run.fl.to_run_config()


def run_child(cmd: list[str], log_path: Path, grace: float = 30.0) -> None:
    """Run one ``fedshift fl`` child in its own session, output to ``log_path``. Whatever ends the
    wait (the child's exit, an interrupt, SIGTERM unwinding us), its whole process group is then
    stopped by PID -- Ray's helpers the child started included: SIGTERM, ``grace`` seconds for Ray's
    shutdown, SIGKILL for what is left."""
    if log_path.suffix != ".log":
        raise ValueError(f"the child's log must be a .log file, got {log_path}")
    group = ProcessGroup(log_path.parent)
    try:
        rc = group.start(log_path.stem, cmd).wait()
    finally:
        group.stop_all(grace=grace)
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"run failed (exit {rc}): {shlex.join(cmd)}\n--- {log_path} (tail) ---\n{tail}")


def child_command(config_path: Path) -> list[str]:
    """The ``fedshift fl`` process that runs one role file."""
    return [sys.executable, "-m", "simulations.cli", "fl", "--config", str(config_path)]


def run_comparison(base: FLRun, strategies: Sequence[str], seeds: Sequence[int], out: Path,
                   force: bool = False, report: str = "final") -> Path:
    """Run (or reuse) every strategy × seed with ``base``'s other settings, each run in its own
    ``fedshift fl`` process under ``out/<strategy>-seed<seed>``; write the table and plot; return
    the table's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base.write(out / ROLE_FILE)
    plan = [(s, k) for k in seeds for s in strategies]
    results: list[FLResult] = []
    t0 = time.perf_counter()
    for i, (strategy, seed) in enumerate(plan, 1):
        run_dir = out / f"{strategy}-seed{seed}"
        run = FLRun(fl=base.fl.replace(strategy=strategy, seed=seed, out_dir=str(run_dir)),
                    simulation=base.simulation)
        if not force and _reusable(run_dir / "results.json", run):
            log.info("[%d/%d] %s seed %d: reusing %s", i, len(plan), strategy, seed, run_dir)
        else:
            t = time.perf_counter()
            log.info("[%d/%d] %s seed %d: running (log: %s)", i, len(plan), strategy, seed, run_dir / "run.log")
            run_dir.mkdir(parents=True, exist_ok=True)
            run_child(child_command(run.write(run_dir / ROLE_FILE)), run_dir / "run.log")
            log.info("[%d/%d] %s seed %d: done in %.0f s", i, len(plan), strategy, seed, time.perf_counter() - t)
        res = FLResult.read(run_dir / "results.json")
        log.info("[%d/%d] %s seed %d: mean accuracy %s (val %s)", i, len(plan), strategy, seed,
                 _pct(res.mean_accuracy), _pct(res.mean_val_accuracy))
        results.append(res)
    command = shlex.join(["fedshift", "fl", "compare", "--config", str(out / ROLE_FILE), "--strategies",
                          *strategies, "--seeds", *map(str, seeds), "--out", str(out), "--report", report])
    summary = replace(summarize(results, report), command=command, wall_seconds=time.perf_counter() - t0)
    (out / "comparison.json").write_text(json.dumps(summary.to_json(), indent=1) + "\n")
    table = out / "comparison.md"
    table.write_text(markdown_table(summary))
    plot_accuracy(results, out / "accuracy_vs_round.png")
    log.info("wrote %s, %s and %s (%.0f s)", table, out / "comparison.json", out / "accuracy_vs_round.png",
             summary.wall_seconds)
    return table


def _pct(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "n/a"


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample std over seeds (a missing value counts as NaN, so it shows instead of vanishing)."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: Sequence[float | None]) -> "MeanStd":
        arr = np.asarray([np.nan if v is None else v for v in values], dtype=float)
        return cls(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0)

    def pct(self, signed: bool = False) -> str:
        return f"{100 * self.mean:{'+' if signed else ''}.1f} ± {100 * self.std:.1f}"


@dataclass(frozen=True)
class StrategyRow:
    """One strategy over its seeds: test accuracy per client domain and overall, validation overall."""

    seeds: tuple[int, ...]
    per_domain: Mapping[str, MeanStd]
    mean: MeanStd
    val_mean: MeanStd


@dataclass(frozen=True)
class PairedDiff:
    """``a − b`` of mean accuracy on the seeds both ran, per seed (test and validation)."""

    a: str
    b: str
    seeds: tuple[int, ...]
    test: tuple[float, ...]
    val: tuple[float, ...]

    @property
    def test_mean_std(self) -> MeanStd:
        return MeanStd.of(self.test)

    @property
    def val_mean_std(self) -> MeanStd:
        return MeanStd.of(self.val)


@dataclass(frozen=True)
class Comparison:
    """What ``fedshift fl compare`` reports: the table, the paired differences, the shared settings."""

    strategies: tuple[str, ...]
    domains: tuple[str, ...]
    table: Mapping[str, StrategyRow]
    paired: tuple[PairedDiff, ...]
    config: Mapping[str, Any]
    report: str = "final"
    command: str = ""
    wall_seconds: float = 0.0

    def pair(self, a: str, b: str) -> PairedDiff:
        """The paired difference ``a − b`` (a ``KeyError`` if either did not run)."""
        for p in self.paired:
            if (p.a, p.b) == (a, b):
                return p
        raise KeyError(f"{a} − {b}: not both in this comparison ({', '.join(self.strategies)})")

    def to_json(self) -> dict[str, Any]:
        """comparison.json: every field, the paired differences with their mean ± std."""
        out = asdict(self)
        out["paired"] = [{**asdict(p), "test_mean_std": asdict(p.test_mean_std), "val_mean_std": asdict(p.val_mean_std)}
                         for p in self.paired]
        return out


def _diff(a: float | None, b: float | None) -> float:
    return a - b if a is not None and b is not None else float("nan")


def summarize(results: Sequence[FLResult], report: str = "final") -> Comparison:
    """Per strategy: per-domain and mean accuracy over seeds; paired per-seed differences; the
    accuracies of ``report`` mode (:meth:`FLResult.report`: final round, or best validation)."""
    by: dict[str, dict[int, Report]] = {}
    for r in results:
        by.setdefault(r.strategy, {})[r.seed] = r.report(report)
    strategies = tuple([s for s in NAMES if s in by] + sorted(set(by) - set(NAMES)))
    domains = tuple(results[0].per_client_accuracy) if results else ()
    table: dict[str, StrategyRow] = {}
    for s in strategies:
        runs = [by[s][k] for k in sorted(by[s])]
        table[s] = StrategyRow(seeds=tuple(sorted(by[s])),
                               per_domain={d: MeanStd.of([r.per_client_accuracy.get(d) for r in runs]) for d in domains},
                               mean=MeanStd.of([r.mean_accuracy for r in runs]),
                               val_mean=MeanStd.of([r.mean_val_accuracy for r in runs]))
    pairs = []
    for a, b in PAIRS:
        if a in by and b in by:
            seeds = tuple(sorted(set(by[a]) & set(by[b])))
            pairs.append(PairedDiff(a, b, seeds,
                                    test=tuple(_diff(by[a][k].mean_accuracy, by[b][k].mean_accuracy) for k in seeds),
                                    val=tuple(_diff(by[a][k].mean_val_accuracy, by[b][k].mean_val_accuracy)
                                              for k in seeds)))
    return Comparison(strategies, domains, table, tuple(pairs), dict(results[0].config) if results else {}, report)


def markdown_table(summary: Comparison) -> str:
    """The Markdown report: accuracy (%) mean ± std over seeds, then paired differences."""
    doms = summary.domains
    seeds = sorted({k for row in summary.table.values() for k in row.seeds})
    when = "each client's best-validation round" if summary.report == "best_val" else "final round"
    lines = [f"Test accuracy (%) per client domain, mean ± std over seeds {', '.join(map(str, seeds))}; "
             f"{when}; each client's model (with its local layers) on its own test split.", "",
             "| method | " + " | ".join(doms) + " | **mean** | val mean |",
             "|---|" + "---|" * (len(doms) + 2)]
    for s in summary.strategies:
        row = summary.table[s]
        lines.append(f"| {NAMES.get(s, s)} | " + " | ".join(row.per_domain[d].pct() for d in doms)
                     + f" | **{row.mean.pct()}** | {row.val_mean.pct()} |")
    if summary.paired:
        lines += ["", "Paired per-seed differences of mean accuracy (percentage points):", "",
                  "| difference | per seed (test) | test mean ± std | val mean ± std |", "|---|---|---|---|"]
        for p in summary.paired:
            per = ", ".join(f"{100 * d:+.1f}" for d in p.test)
            lines.append(f"| {NAMES.get(p.a, p.a)} − {NAMES.get(p.b, p.b)} | {per} | "
                         f"{p.test_mean_std.pct(signed=True)} | {p.val_mean_std.pct(signed=True)} |")
    cfg = summary.config
    keep = ("rounds", "clients", "image-size", "train-per-client", "model", "model-width", "local-epochs",
            "local-steps", "batch-size", "lr", "momentum", "augment", "proximal-mu", "fraug-lr-aux",
            "fraug-momentum-aux", "fraug-lambda-t")
    lines += ["", "Settings: " + ", ".join(f"{k}={cfg[k]}" for k in keep if k in cfg) + "."]
    if summary.command:
        lines += ["", f"Command: `{summary.command}`"]
    return "\n".join(lines) + "\n"


def plot_accuracy(results: Sequence[FLResult], path: Path) -> None:
    """Mean client test accuracy vs round per strategy (mean over seeds, band = ±1 std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[list[float | None]]] = {}
    for r in results:
        by.setdefault(r.strategy, []).append([h.mean_accuracy for h in r.history])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in [s for s in NAMES if s in by]:
        n = min(len(c) for c in by[s])
        curves = np.array([c[:n] for c in by[s]], dtype=float) * 100
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
