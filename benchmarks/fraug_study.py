"""Where does FRAug help? FRAug − FedBN (and FedBN − FedAvg, FedBN − local-only) against rounds
and samples per client, in the authors' training setup; resumable (issue 11).

    python benchmarks/fraug_study.py --stage grid          # λ_T × lr_aux on validation, once per dataset
    python benchmarks/fraug_study.py --stage main          # strategies × sizes × seeds, 300 rounds
    python benchmarks/fraug_study.py --summary [--plot docs/fraug_study.png]

Every cell is one real ``fedshift fl`` run (Flower's simulation engine, its own process) of
:data:`AUTHORS` -- 20 local steps × batch 64 per round, SGD lr 0.01 / momentum 0.5 for the model
and, separately, for FRAug's generator and RTNet, the crop-colour image augmentation -- on one
dataset (:data:`DATASETS`: glyph-shift at 10 and 100 classes, digits-shift) with ``size`` training
images per client, 5 clients (one domain each). One small JSON per finished cell in ``--out-dir``
(cells there are skipped, so a stopped study continues where it stopped, here or elsewhere): per
report round R in :data:`ROUNDS`, the mean and per-client test accuracy at the final round R and at
each client's best-validation round up to R.

Why one 300-round run serves R = 40, 100 and 300: nothing in a run depends on its total length but
FRAug's λ schedule, λ_t = min(λ_max, exp(γ(t − T))), and with the authors' Digits γ = 0.002 and
λ_max = 0.5 it is λ_max in every round for T ≤ 347 (:func:`prefix_exact` checks it), so a run's
first R rounds are exactly an R-round run. No lr schedule exists to break that.

Stages:

- ``grid``: FRAug's λ_T × lr_aux over the authors' grid ({0.1, 1, 10} × {0.05, 0.025}), seed 0,
  :data:`GRID_SIZE` images per client, :data:`GRID_ROUNDS` rounds, picked by the mean *validation*
  accuracy at each client's best-validation round; searched once per dataset at that one size and
  reused by every size (a saving the README states);
- ``main``: FedBN and FRAug (the tuned λ_T / lr_aux) at every size of :data:`SIZES`, FedAvg and
  local-only at :data:`BASELINE_SIZES`, seeds 0 1 2, :data:`MAX_ROUNDS` rounds; one size at a time
  (the baseline size first, all seeds), in the order of ``--datasets``; ``--sizes`` picks sizes.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.study_cells import load_done, run_cells, unwind_on_sigterm  # noqa: E402

log = logging.getLogger("bench.fraug_study")

AUTHORS: dict[str, Any] = {  # FRAug's released training setup (METHODS.md), for every strategy
    "local-steps": 20, "batch-size": 64, "lr": 0.01, "momentum": 0.5, "fraug-momentum-aux": 0.5,
    "augment": "crop-colour", "clients": 5, "image-size": 16, "model": "digits_cnn", "model-width": 0.25,
    "fraug-gamma": 0.002, "fraug-lambda-max": 0.5, "tensorboard": False, "checkpoint-every": 1000,
}
DATASETS: dict[str, dict[str, Any]] = {
    "glyph10": {"dataset": "glyph-shift", "classes": 10, "val-per-client": 250, "test-per-client": 500},
    "glyph100": {"dataset": "glyph-shift", "classes": 100, "val-per-client": 250, "test-per-client": 500},
    "digits": {"dataset": "digits-shift"},
}
SIZES: dict[str, tuple[int, ...]] = {"glyph10": (30, 100, 300, 1000), "glyph100": (30, 100, 300, 1000),
                                     "digits": (30, 100, 0)}  # digits-shift: 0 = all (~215) per client
MODE_WORDS = {"best_val": "each client's best-validation round", "final": "final round"}
DIGITS_ALL = 215  # digits-shift's training images per client when it keeps them all (size 0), for the plot
BASELINE_SIZES: dict[str, tuple[int, ...]] = {"glyph10": (100,), "glyph100": (300,), "digits": (0,)}
ROUNDS = (40, 100, 300)
MAX_ROUNDS = max(ROUNDS)
PLOT_MIN_SEEDS = 3  # a size's point is drawn once this many seeds are paired (the tables show any count)
GRID = tuple((lt, lr) for lt in (0.1, 1.0, 10.0) for lr in (0.05, 0.025))  # (λ_T, lr_aux): the authors'
GRID_SIZE = {"glyph10": 100, "glyph100": 300, "digits": 100}
GRID_ROUNDS = 100


@dataclass(frozen=True)
class Cell:
    """One FL run: dataset, strategy, images per client, seed, FRAug's (λ_T, lr_aux) and rounds."""

    data: str
    strategy: str
    size: int
    seed: int
    lambda_t: float | None = None  # FRAug only; None in a main cell = the tuned value
    lr_aux: float | None = None
    rounds: int = MAX_ROUNDS
    stage: str = "main"

    @property
    def key(self) -> str:
        aux = f"-lt{self.lambda_t:g}-lr{self.lr_aux:g}" if self.lambda_t is not None else ""
        return f"{self.data}-n{self.size}-{self.stage}{self.rounds}-{self.strategy}{aux}-seed{self.seed}"


def cells(stage: str, datasets: Sequence[str], seeds: Sequence[int], sizes: Sequence[int] | None = None) -> list[Cell]:
    """The cells of ``stage`` in run order; ``sizes`` keeps only those images-per-client (main stage).

    Main cells are size-major, the baseline size first, then seed-major: a study stopped early has
    complete paired comparisons (every seed, FedAvg and local-only included) at the sizes it did,
    rather than one seed of every size.
    """
    out: list[Cell] = []
    for d in datasets:
        if stage == "grid":
            out += [Cell(d, "fraug", GRID_SIZE[d], 0, lt, lr, GRID_ROUNDS, "grid") for lt, lr in GRID]
            continue
        order = sorted(SIZES[d], key=lambda s: (s not in BASELINE_SIZES[d], SIZES[d].index(s)))
        for size in (s for s in order if sizes is None or s in sizes):
            for seed in seeds:
                out += [Cell(d, "fedbn", size, seed), Cell(d, "fraug", size, seed)]
                if size in BASELINE_SIZES[d]:
                    out += [Cell(d, "fedavg", size, seed), Cell(d, "local", size, seed)]
    return out


def prefix_exact(rounds: int, gamma: float = AUTHORS["fraug-gamma"], lam: float = AUTHORS["fraug-lambda-max"]) -> bool:
    """FRAug's λ_t is λ_max from round 1 to ``rounds``: a run's prefixes are shorter runs."""
    from core.fraug import lambda_schedule

    return all(lambda_schedule(t, rounds, gamma, lam) == lam for t in (1, rounds))


def tuned(data: str, done: dict[str, dict]) -> tuple[float, float]:
    """The grid's (λ_T, lr_aux) with the best validation accuracy (best-validation rounds) for ``data``."""
    scores = {}
    for lt, lr in GRID:
        cell = done.get(Cell(data, "fraug", GRID_SIZE[data], 0, lt, lr, GRID_ROUNDS, "grid").key)
        if cell is None:
            raise LookupError(f"{data}: run --stage grid first ((λ_T, lr_aux) = ({lt:g}, {lr:g}) missing)")
        scores[(lt, lr)] = cell["report"][str(GRID_ROUNDS)]["best_val"]["mean_val_accuracy"]
    return max(GRID, key=lambda g: (scores[g], -GRID.index(g)))


def run_config(cell: Cell, lambda_t: float | None, lr_aux: float | None, out: Path) -> dict[str, Any]:
    cfg = {**AUTHORS, **DATASETS[cell.data], "strategy": cell.strategy, "seed": cell.seed, "rounds": cell.rounds,
           "train-per-client": cell.size, "out-dir": str(out)}
    if cell.strategy == "fraug":
        cfg.update({"fraug-lambda-t": lambda_t, "fraug-lr-aux": lr_aux})
    return cfg


def summarize_run(result: Any, rounds: Sequence[int]) -> dict[str, Any]:
    """Per report round R: final-round and best-validation numbers of the run's first R rounds."""
    out: dict[str, Any] = {}
    for r in rounds:
        if not result.history or result.history[-1].round < r:
            continue
        history = tuple(h for h in result.history if h.round <= r)
        last = history[-1]
        prefix = replace(result, history=history, mean_accuracy=last.mean_accuracy,
                         per_client_accuracy={n: c.test_accuracy for n, c in last.clients.items()},
                         mean_val_accuracy=last.mean_val_accuracy,
                         per_client_val_accuracy={n: c.val_accuracy for n, c in last.clients.items()})
        out[str(r)] = {mode: asdict(prefix.report(mode)) for mode in ("final", "best_val")}
    return out


def run_cell(cell: Cell, args: argparse.Namespace, done: dict[str, dict]) -> dict[str, Any]:
    from core.fl_config import FLConfig, FLResult
    from simulations.fl_compare import child_command, run_child
    from simulations.fl_role import FLRun, SimulationResources

    lt, lr = cell.lambda_t, cell.lr_aux
    if cell.strategy == "fraug" and lt is None:
        lt, lr = tuned(cell.data, done)
    out = Path(args.runs) / cell.key
    out.mkdir(parents=True, exist_ok=True)
    run = FLRun(fl=FLConfig.from_run_config(run_config(cell, lt, lr, out)),
                simulation=SimulationResources(num_cpus=args.cpus))
    start = time.monotonic()
    run_child(child_command(run.write(out / "fl.toml")), out / "run.log")
    result = FLResult.read(out / "results.json")
    if not result.complete:
        raise RuntimeError(f"{cell.key}: the run stopped at round {result.history[-1].round if result.history else 0}")
    return {**asdict(cell), "key": cell.key, "lambda_t": lt, "lr_aux": lr, "wall_s": round(time.monotonic() - start, 1),
            "report": summarize_run(result, [r for r in (*ROUNDS, cell.rounds) if r <= cell.rounds]),
            "config": result.config, "command": f"python benchmarks/fraug_study.py  (cell {cell.key})"}




# ------------------------------------------------------------------------------------ summary


def todo_table(todo: Sequence[Cell], done: dict[str, dict]) -> str:
    """The cells still to run, each with an estimate: the median wall time of the finished cells of
    its dataset and strategy (else of its strategy; ``?`` with neither), and the total."""
    def estimate(cell: Cell) -> float | None:
        for same in (lambda c: c["data"] == cell.data and c["strategy"] == cell.strategy,
                     lambda c: c["strategy"] == cell.strategy):
            walls = [c["wall_s"] * cell.rounds / c["rounds"] for c in done.values() if same(c) and c.get("wall_s")]
            if walls:
                return statistics.median(walls)
        return None

    rows, total, unknown = [], 0.0, 0
    for cell in todo:
        est = estimate(cell)
        total += est or 0.0
        unknown += est is None
        rows.append(f"| {cell.key} | {f'{est / 60:.0f}' if est is not None else '?'} |")
    head = ["| cell still to run | minutes (estimated) |", "|---|---|"]
    tail = f"\n{len(todo)} cells, ≈ {total / 3600:.1f} h" + (f" (+ {unknown} without an estimate)" if unknown else "")
    return "\n".join(head + rows) + "\n" + tail


def _pm(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    return f"{mean:+.1f}" if len(values) < 2 else f"{mean:+.1f} ± {100 * statistics.stdev(values):.1f}"


def paired(done: dict[str, dict], data: str, size: int, a: str, b: str, rounds: int, mode: str,
           domain: str | None = None) -> list[float]:
    """Per-seed differences of test accuracy, strategy ``a`` − ``b`` (main cells): the clients' mean,
    or client ``domain``'s own."""
    by = {(c["strategy"], c["seed"]): c for c in done.values()
          if c["stage"] == "main" and c["data"] == data and c["size"] == size}
    out = []
    for (strategy, seed), c in sorted(by.items()):
        other = by.get((b, seed))
        if strategy != a or other is None or str(rounds) not in c["report"] or str(rounds) not in other["report"]:
            continue
        x, y = (_test_accuracy(cell["report"][str(rounds)][mode], domain) for cell in (c, other))
        if x is not None and y is not None:
            out.append(x - y)
    return out


def _test_accuracy(report: dict[str, Any], domain: str | None) -> float | None:
    return report["mean_accuracy"] if domain is None else report["per_client_accuracy"].get(domain)


def _domains(main: list[dict], data: str) -> list[str]:
    """The client domains of ``data``'s cells, in the built-in domain order (the JSON's keys are sorted)."""
    from core.data.domains import DOMAINS

    names = {d for c in main if c["data"] == data for d in c["report"][str(MAX_ROUNDS)]["final"]["per_client_accuracy"]}
    return [d for d in DOMAINS if d in names] + sorted(names - set(DOMAINS))


def _accuracy(main: list[dict], data: str, size: int, strategy: str, mode: str) -> str:
    """Mean test accuracy (%) over seeds at round 300, or ``–``."""
    values = [c["report"][str(MAX_ROUNDS)][mode]["mean_accuracy"] for c in main
              if c["data"] == data and c["size"] == size and c["strategy"] == strategy and str(MAX_ROUNDS) in c["report"]]
    return f"{100 * statistics.fmean(values):.1f}" if values else "–"


def summary(done: dict[str, dict], mode: str = "best_val") -> str:
    lines: list[str] = []
    grid = [c for c in done.values() if c["stage"] == "grid"]
    if grid:
        lines += [f"### FRAug's (λ_T, lr_aux) on validation ({GRID_ROUNDS} rounds, seed 0, best-validation rounds)",
                  "", "| dataset | images/client | " + " | ".join(f"λ_T {lt:g}, lr {lr:g}" for lt, lr in GRID)
                  + " | picked |", "|---|---|" + "---|" * (len(GRID) + 1)]
        for data in sorted({c["data"] for c in grid}):
            row = {(c["lambda_t"], c["lr_aux"]): c for c in grid if c["data"] == data}
            vals = [f"{100 * row[g]['report'][str(GRID_ROUNDS)]['best_val']['mean_val_accuracy']:.1f}"
                    if g in row else "–" for g in GRID]
            try:
                pick = "λ_T {:g}, lr {:g}".format(*tuned(data, done))
            except LookupError:
                pick = "(grid incomplete)"
            lines.append(f"| {data} | {GRID_SIZE[data]} | " + " | ".join(vals) + f" | {pick} |")
        lines.append("")
    main = [c for c in done.values() if c["stage"] == "main"]
    for data in sorted({c["data"] for c in main}):
        label = MODE_WORDS[mode]
        lines += [f"### {data}: mean test accuracy (%) and paired per-seed differences (points; {label})", "",
                  f"| images/client | seeds | FedBN @{MAX_ROUNDS} | FRAug @{MAX_ROUNDS} | "
                  + " | ".join(f"FRAug − FedBN @{r}" for r in ROUNDS) + f" | per seed @{MAX_ROUNDS}"
                  + f" | FedBN − FedAvg @{MAX_ROUNDS} | FedBN − local @{MAX_ROUNDS} |",
                  "|---|---|---|---|" + "---|" * (len(ROUNDS) + 3)]
        sizes = sorted({c["size"] for c in main if c["data"] == data}, key=lambda s: (s == 0, s))
        for size in sizes:
            diffs = [paired(done, data, size, "fraug", "fedbn", r, mode) for r in ROUNDS]
            base = [paired(done, data, size, "fedbn", b, MAX_ROUNDS, mode) for b in ("fedavg", "local")]
            accs = [_accuracy(main, data, size, strategy, mode) for strategy in ("fedbn", "fraug")]
            seeds = len(diffs[-1]) or len(diffs[0])
            per_seed = ", ".join(f"{100 * d:+.1f}" for d in diffs[-1]) or "–"
            lines.append(f"| {size or 'all'} | {seeds} | " + " | ".join(accs) + " | "
                         + " | ".join([*(_pm(d) for d in diffs), per_seed, *(_pm(d) for d in base)]) + " |")
        lines.append("")
        domains = _domains(main, data)
        lines += [f"{data}: FRAug − FedBN @{MAX_ROUNDS} per client domain (points; per seed, then mean ± std)", "",
                  "| images/client | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        for size in sizes:
            per = [paired(done, data, size, "fraug", "fedbn", MAX_ROUNDS, mode, d) for d in domains]
            if any(per):
                lines.append(f"| {size or 'all'} | " + " | ".join(
                    (", ".join(f"{100 * v:+.1f}" for v in d) + f" ({_pm(d)})") if d else "–" for d in per) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_points(done: dict[str, dict], data: str, sizes: Sequence[int], rounds: int, mode: str) -> list[tuple[int, list[float]]]:
    """The sizes the plot draws, with their paired differences: those with at least
    :data:`PLOT_MIN_SEEDS` seeds, so a half-run size does not show as a point without an error bar."""
    pts = [(s, paired(done, data, s, "fraug", "fedbn", rounds, mode)) for s in sizes]
    return [(s, d) for s, d in pts if len(d) >= PLOT_MIN_SEEDS]


def plot(done: dict[str, dict], path: Path, mode: str = "best_val") -> None:
    """FRAug − FedBN (mean ± std over seeds) vs images per client, one line per report round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [c for c in done.values() if c["stage"] == "main"]
    datas = sorted({c["data"] for c in main if c["strategy"] == "fraug"
                    and plot_points(done, c["data"], [c["size"]], MAX_ROUNDS, mode)})
    if not datas:
        return
    fig, axes = plt.subplots(1, len(datas), figsize=(5 * len(datas), 4), squeeze=False, sharey=True)
    for ax, data in zip(axes[0], datas):
        sizes = sorted({s for s, _ in plot_points(done, data, {c["size"] for c in main if c["data"] == data},
                                                   MAX_ROUNDS, mode)}, key=lambda s: (s == 0, s))
        xs = [s or DIGITS_ALL for s in sizes]
        for i, r in enumerate(ROUNDS):  # each round's points a little apart, so the error bars do not overlap
            shift = 1 + 0.04 * (i - (len(ROUNDS) - 1) / 2)
            pts = [((s or DIGITS_ALL) * shift, d) for s, d in plot_points(done, data, sizes, r, mode)]
            if pts:
                ax.errorbar([x for x, _ in pts], [100 * statistics.fmean(d) for _, d in pts],
                            yerr=[100 * statistics.stdev(d) for _, d in pts],
                            marker="o", capsize=3, label=f"{r} rounds")
        ax.axhline(0, color="grey", linestyle="--")
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.4, max(xs) * 1.4)  # a one-size panel too: the shifted points stay close
        ax.set_xticks(xs, [str(s) if s else f"all (≈{DIGITS_ALL})" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training images per client (log)")
        if ax is axes[0][0]:
            ax.set_ylabel("FRAug − FedBN, points (paired per seed)")
        ax.set_title(f"{data} ({'best-validation rounds' if mode == 'best_val' else 'final round'})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("grid", "main"), default="grid")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="main stage: only these images per client (0 = digits-shift's all); default every size")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of each run's simulation engine")
    p.add_argument("--out-dir", default="benchmarks/results/fraug_study")
    p.add_argument("--runs", default="runs/fraug_study", help="run folders of the cells (not committed)")
    p.add_argument("--max-cells", type=int, default=0, help="stop after this many new cells (0: all)")
    p.add_argument("--summary", action="store_true", help="print the tables of the finished cells and exit")
    p.add_argument("--todo", action="store_true", help="list the cells of --stage/--datasets/--sizes still to run, "
                   "with estimated times, and exit")
    p.add_argument("--report", choices=("best_val", "final"), default="best_val")
    p.add_argument("--plot", type=Path, default=None)
    return p.parse_args(argv)


def _describe(cell: Cell, result: dict[str, Any]) -> str:
    last = result["report"][str(cell.rounds)]
    return "test {:.1f}% (best-val rounds {:.1f}%)".format(100 * (last["final"]["mean_accuracy"] or math.nan),
                                                          100 * (last["best_val"]["mean_accuracy"] or math.nan))


def main(argv: list[str] | None = None) -> int:
    unwind_on_sigterm()  # the cell's cloud / edge / Flower processes are stopped, not orphaned
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if not prefix_exact(MAX_ROUNDS):
        raise SystemExit(f"FRAug's λ schedule is not constant over {MAX_ROUNDS} rounds: prefixes would not be runs")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = load_done(out_dir)
    failed: list[str] = []
    todo = [c for c in cells(args.stage, args.datasets, args.seeds, args.sizes) if c.key not in done]
    if args.todo:
        print(todo_table(todo, done))
        return 0
    if not args.summary:
        log.info("%d cells to run (%d already done)", len(todo), len(done))
        failed = run_cells(todo[:args.max_cells or None], lambda cell: run_cell(cell, args, done), out_dir,
                           done, _describe)
    table = summary(done, args.report)
    print(table)
    (out_dir / "SUMMARY.md").write_text(table + "\n")
    if args.plot is not None:
        plot(done, args.plot, args.report)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
