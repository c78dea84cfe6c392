"""Where does CEMA's entropy selection beat random uploads? The issue-10 study, resumable.

    python benchmarks/cema_study.py --stage tune                    # the cloud's lr, on validation streams
    python benchmarks/cema_study.py --stage preconditions           # does the cloud help? do uploads help?
    python benchmarks/cema_study.py --stage selection               # random vs CEMA vs EATA vs oracle
    python benchmarks/cema_study.py --summary                       # the tables from the finished cells

Every cell is one real ``fedshift adapt`` run (:func:`simulations.adapt.run_adapt`: a cloud process
and an edge process on loopback, lockstep, seeded) on glyph-shift with ``--samples`` distinct test
images per corruption, the built-in edge model and robust teacher. One JSON per finished cell in
``--out-dir``; cells already there are skipped, so a stopped study continues where it stopped, on
this machine or another. Each cell's JSON also carries the two no-cloud baselines measured on the
very same stream (no adaptation = source statistics; edge BN statistics = each batch's own).

Stages (each a list of cells per group = classes × severity × protocol × edge normalization):

- ``tune``: the cloud's student learning rate (teacher's = a tenth, CEMA's 10:1) from the grid
  ``LRS``, with random 25 % uploads, on streams built from the *validation* split (``samples`` and
  ``passes`` chosen so a stream is as long as a test one), seed 0 only: the grid is searched once
  per group and the best lr is used by every later cell of that group (recorded in its JSON);
- ``preconditions``: random uploads at 10 / 50 % and distill-all (100 %), to check (1) that the cloud
  clearly beats edge BN statistics and (2) that more uploads help -- entropy selection can only beat
  random where both hold (METHODS.md);
- ``selection``: random at 5 / 25 %, CEMA (ours), cema_released (the authors' released rule) and the
  oracle at their own rates, random at CEMA's own rate (read from the finished CEMA cell of the same
  seed), and CEMA and EATA-style selection at matched budgets of 5 / 10 / 25 / 50 %.

The corruption subset is one per ImageNet-C family (noise, blur, weather, digital) by default;
``--corruptions all`` runs the 15.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.study_cells import load_done, run_cells, unwind_on_sigterm  # noqa: E402
from core.renorm import EDGE_NORMS  # noqa: E402
from protos.contract import PROTOCOLS  # noqa: E402

log = logging.getLogger("bench.cema_study")

SUBSET = ("impulse_noise", "motion_blur", "frost", "contrast")  # one per family
RATES = {"preconditions": (0.1, 0.5), "selection": (0.05, 0.25)}
BUDGETS = (0.05, 0.1, 0.25, 0.5)
LRS = (1e-2, 2.5e-3, 1e-3, 2.5e-4, 1e-4)  # student lr grid: the small-scale default, the authors', three below
TUNE_RATE = 0.25


@dataclass(frozen=True)
class Cell:
    """One adapt run: its group, its method and the knob that sets its upload rate."""

    classes: int
    severity: int
    protocol: str
    norm: str  # edge normalization of the cloud methods
    method: str  # an adapt method (simulations.adapt.METHODS)
    seed: int
    rate: float | None = None  # random's keep probability
    budget: float | None = None  # cema / eata budget
    rate_of: str = ""  # random at the upload rate of this method's cell (same group and seed)
    lr: float | None = None  # tune cells: the student lr tried (others: the tuned one, resolved at run time)
    cset: str = "subset"  # the corruptions: SUBSET (one per family) or "all" 15 (the headline rows)
    preset: str = "small"  # the cloud's constants: small (lr tuned on validation) or authors (theirs, untuned)

    @property
    def label(self) -> str:
        if self.rate_of:
            return f"random@{self.rate_of}"
        if self.rate is not None:
            return f"random {100 * self.rate:g}%"
        if self.budget is not None:
            return f"{self.method} budget {100 * self.budget:g}%"
        return self.method

    @property
    def group(self) -> str:
        tag = ("" if self.cset == "subset" else f"-{self.cset}15") + ("" if self.preset == "small" else f"-{self.preset}")
        return f"glyph{self.classes}-sev{self.severity}-{self.protocol}-{self.norm}{tag}"

    @property
    def tune_group(self) -> "Cell":
        """The cell whose group's lr grid this cell uses: the grid is searched once per classes x edge
        normalization, on the subset at severity 5 in the reset protocol, and reused by the other
        severities, protocols and the 15-corruption rows (a saving the README states)."""
        return replace(self, severity=5, protocol="reset", cset="subset")

    @property
    def key(self) -> str:
        knob = (f"-at-{self.rate_of}" if self.rate_of else f"-r{self.rate:g}" if self.rate is not None
                else f"-b{self.budget:g}" if self.budget is not None else "")
        tune = f"-val-lr{self.lr:g}" if self.lr is not None else ""
        return f"{self.group}{tune}-{self.method}{knob}-seed{self.seed}"


def cells(stage: str, *, classes: Sequence[int], severities: Sequence[int], protocols: Sequence[str],
          norms: Sequence[str], seeds: Sequence[int], cset: str = "subset",
          only: Sequence[str] = (), preset: str = "small") -> list[Cell]:
    """The stage's cells, seed-major within a group; ``only`` keeps the cells with these labels (a
    pruned sweep: the README names what was left out)."""
    out = list(dict.fromkeys(_cells(stage, classes, severities, protocols, norms, seeds, cset)))
    if preset != "small":
        if stage == "tune":
            raise ValueError("the authors' preset runs their own constants: it has no lr grid to tune")
        out = [replace(c, preset=preset) for c in out]
    return [c for c in out if not only or c.label in only]


def _cells(stage: str, classes: Sequence[int], severities: Sequence[int], protocols: Sequence[str],
           norms: Sequence[str], seeds: Sequence[int], cset: str) -> list[Cell]:
    out: list[Cell] = []  # seed-major within a group: a study stopped early has every norm at equal seeds
    for c in classes:
        for sev in severities:
            for proto in protocols:
                for seed in seeds:
                    for norm in norms:
                        base = Cell(c, sev, proto, norm, "random", seed, cset=cset)
                        if stage == "tune":
                            if seed == seeds[0]:  # searched once, recorded as seed 0's, for its tune group
                                out += [replace(base.tune_group, rate=TUNE_RATE, lr=lr, seed=0) for lr in LRS]
                        elif stage == "preconditions":
                            out += [replace(base, rate=r) for r in RATES[stage]]
                            out.append(replace(base, method="distill_all"))
                        else:
                            out += [replace(base, rate=r) for r in RATES[stage]]
                            out += [replace(base, method=m) for m in ("cema", "cema_released", "oracle")]
                            out.append(replace(base, rate_of="cema"))
                            out += [replace(base, method=m, budget=b) for b in BUDGETS for m in ("cema", "eata")]
    return out


def adapt_config(cell: Cell, args: argparse.Namespace, rate: float | None, lr: float | None):
    from core.cema import CemaConfig
    from core.corruptions import CORRUPTIONS
    from core.data.builtin import DOMAINS, GLYPH_DEFAULT_SIZES, BuiltinData
    from edge.selection import SelectionConfig
    from server.config import CloudConfig
    from simulations.adapt import AdaptConfig, simulation_edge

    edge = simulation_edge()
    edge = replace(edge, selection=SelectionConfig(random_rate=rate, budget=cell.budget))
    cema = CemaConfig(student_lr=lr, teacher_lr=lr / 10) if lr is not None else CemaConfig(preset=cell.preset)
    cloud = CloudConfig(cema=cema, threads=args.cloud_threads)
    corruptions = CORRUPTIONS if cell.cset == "all" else tuple(args.corruptions)
    data = BuiltinData("glyph-shift", cell.classes)
    samples, passes, split = args.samples, 1, "test"
    if cell.lr is not None:  # a tune cell: validation images, as many samples per corruption as a test stream
        split = "val"
        pool = (data.val_per_client or GLYPH_DEFAULT_SIZES["val_per_client"]) * len(DOMAINS)
        passes = max(1, math.ceil(args.samples / pool))
        samples = min(pool, math.ceil(args.samples / passes))
    return AdaptConfig(method="random" if rate is not None else cell.method, corruptions=corruptions,
                       severity=cell.severity, protocol=cell.protocol, samples=samples, passes=passes,
                       seed=cell.seed, data=data, split=split, edge_norm=cell.norm, edge=edge, cloud=cloud,
                       timeout_s=args.cell_timeout)


def tuned_lr(cell: Cell, done: dict[str, dict]) -> float:
    """The student lr of the grid with the best validation accuracy for this cell's group."""
    scores = {}
    base = cell.tune_group
    for lr in LRS:
        tune = done.get(replace(base, method="random", rate=TUNE_RATE, budget=None, rate_of="", lr=lr,
                                seed=0).key)
        if tune is None:
            raise LookupError(f"{cell.key}: run --stage tune for group {base.group} first (lr {lr:g} missing)")
        scores[lr] = tune["accuracy"]
    return max(LRS, key=lambda lr: (scores[lr], -LRS.index(lr)))


def run_cell(cell: Cell, args: argparse.Namespace, done: dict[str, dict]) -> dict:
    from simulations.adapt import run_adapt

    rate = cell.rate
    if cell.rate_of:
        ref = done.get(replace(cell, method=cell.rate_of, rate_of="").key)
        if ref is None:
            raise LookupError(f"{cell.key}: needs the {cell.rate_of} cell of the same seed first")
        rate = ref["upload_rate"]
    lr = cell.lr if cell.lr is not None else tuned_lr(cell, done) if cell.preset == "small" else None
    cfg = adapt_config(cell, args, rate, lr)
    out = Path(args.runs) / cell.key
    shutil.rmtree(out, ignore_errors=True)
    start = time.monotonic()
    r = run_adapt(cfg, out)
    wall = time.monotonic() - start
    assert r.bn_stats_accuracy is not None
    cloud = r.cloud
    return {
        **asdict(cell), "key": cell.key, "label": cell.label, "random_rate": rate,
        "student_lr": cfg.cloud.cema.student_lr, "teacher_lr": cfg.cloud.cema.teacher_lr,
        "cloud_batch": cfg.cloud.cema.batch_size, "split": cfg.split, "passes": cfg.passes,
        "corruptions": list(cfg.corruptions), "samples_per_corruption": args.samples,
        "accuracy": r.accuracy.overall, "per_corruption": r.accuracy.per_corruption,
        "no_adapt": r.no_adapt_accuracy.overall, "bn_stats": r.bn_stats_accuracy.overall,
        "bn_stats_per_corruption": r.bn_stats_accuracy.per_corruption,
        "seen": r.seen, "uploaded": r.uploaded, "upload_rate": r.upload_rate, "bytes_up": r.bytes_up,
        "bytes_down": r.bytes_down, "versions_applied": r.versions_applied,
        "cloud_steps": sum(v.steps for v in cloud.learners.values()) if cloud is not None else 0,
        "cloud_uptime_s": cloud.uptime_s if cloud is not None else 0.0,
        "wall_s": round(wall, 1), "timing_s": asdict(r.timing_s), "cloud_threads": args.cloud_threads,
        "command": f"python benchmarks/cema_study.py  (cell {cell.key})", "code": _code_version(),
    }


def _code_version() -> str:
    """The commit the cell ran (``+dirty`` with uncommitted changes), so cells of one group that ran
    on different code can be told apart."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")




# ------------------------------------------------------------------------------------ summary


def _pm(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    mean = scale * statistics.fmean(values)
    return f"{mean:+.1f}" if len(values) < 2 else f"{mean:+.1f} ± {scale * statistics.stdev(values):.1f}"


def _mean(values: Iterable[float], scale: float = 100.0) -> str:
    values = list(values)
    return f"{scale * statistics.fmean(values):.1f}" if values else "–"


def _matched_random(cell: dict, cells_: list[dict]) -> tuple[float, bool] | None:
    """Random's accuracy at this cell's upload rate, same group and seed: the random cell within
    2 points of it (budgets hit theirs; random@cema is run at CEMA's own), else interpolated
    linearly in the upload rate between the two random cells around it (distill-all as 100 %).
    Returns (accuracy, interpolated) or None when the rate lies outside the random cells run."""
    rnd = sorted((c["upload_rate"], c["accuracy"]) for c in cells_
                 if c["group"] == cell["group"] and c["seed"] == cell["seed"] and c is not cell
                 and c["method"] in ("random", "distill_all"))
    rate = cell["upload_rate"]
    near = [(abs(r - rate), a) for r, a in rnd if abs(r - rate) <= 0.02]
    if near:
        return min(near)[1], False
    for (r0, a0), (r1, a1) in zip(rnd, rnd[1:]):
        if r0 <= rate <= r1 and r1 > r0:
            return a0 + (a1 - a0) * (rate - r0) / (r1 - r0), True
    return None


def summary(done: dict[str, dict]) -> str:
    cells_ = [c for c in done.values() if c.get("split", "test") == "test"]
    tune = [c for c in done.values() if c.get("split") == "val"]
    for c in [*cells_, *tune]:
        c.setdefault("group", Cell(c["classes"], c["severity"], c["protocol"], c["norm"], c["method"], 0,
                                   cset=c.get("cset", "subset"), preset=c.get("preset", "small")).group)
    lines: list[str] = []
    if tune:
        lines += ["### learning-rate grid on validation streams (random 25 % uploads, seed 0)", "",
                  "| group | " + " | ".join(f"student lr {lr:g}" for lr in LRS) + " | edge BN stats |",
                  "|---|" + "---|" * (len(LRS) + 1)]
        for group in sorted({c["group"] for c in tune}):
            row = {c["lr"]: c for c in tune if c["group"] == group}
            any_ = next(iter(row.values()))
            lines.append(f"| {group} | " + " | ".join(f"{100 * row[lr]['accuracy']:.1f}" if lr in row else "–"
                                                     for lr in LRS) + f" | {100 * any_['bn_stats']:.1f} |")
        lines.append("")
    for group in sorted({c["group"] for c in cells_}):
        mine = [c for c in cells_ if c["group"] == group]
        seeds = sorted({c["seed"] for c in mine})
        by_seed = {(c["label"], c["seed"]): c for c in mine}
        first = mine[0]
        lines += [f"### {group}: {len(first['corruptions'])} corruptions ({', '.join(first['corruptions'])}), "
                  f"{first['samples_per_corruption']} samples each, seeds {seeds}", ""]
        no = {s: next(c["no_adapt"] for c in mine if c["seed"] == s) for s in seeds}
        bn = {s: next(c["bn_stats"] for c in mine if c["seed"] == s) for s in seeds}
        lines += [f"no adaptation (source statistics, no cloud): {_mean(no.values())} · edge BN statistics "
                  f"(no cloud): {_mean(bn.values())}", "",
                  "| method | seeds | upload % | MB up | accuracy | − edge BN stats (paired) | "
                  "− random at its rate (paired; interp. = between the random rates around it) |",
                  "|---|---|---|---|---|---|---|"]
        order = {"random": 0, "distill_all": 1, "cema": 2, "cema_released": 3, "eata": 4, "oracle": 5}
        labels = sorted({c["label"] for c in mine},
                        key=lambda lb: (order.get(lb.split()[0].split("@")[0], 9), lb.startswith("random@"),
                                        float(lb.split()[-1].rstrip("%")) if lb.endswith("%") else -1, lb))
        for label in labels:
            cs = [by_seed[(label, s)] for s in seeds if (label, s) in by_seed]
            vs_bn = [c["accuracy"] - c["bn_stats"] for c in cs]
            vs_random, interpolated = [], False
            if not label.startswith("random"):
                for c in cs:
                    m = _matched_random(c, mine)
                    if m is not None:
                        vs_random.append(c["accuracy"] - m[0])
                        interpolated |= m[1]
            lines.append(f"| {label} | {len(cs)} | {_mean(c['upload_rate'] for c in cs)} | "
                         f"{statistics.fmean(c['bytes_up'] for c in cs) / 1e6:.1f} | "
                         f"{_mean(c['accuracy'] for c in cs)} | {_pm(vs_bn)} | "
                         f"{_pm(vs_random) + (' (interp.)' if interpolated else '') if vs_random else '–'} |")
        lines.append("")
    return "\n".join(lines)


def plot(done: dict[str, dict], path: Path) -> None:
    """Accuracy vs upload rate per group (one panel each): random as a line, the rules as markers,
    the no-cloud baselines as horizontal lines; means over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells_ = [c for c in done.values() if c.get("split", "test") == "test"]
    groups = sorted({c["group"] for c in cells_})
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    styles = {"cema": ("o", "C1"), "eata": ("s", "C2"), "cema_released": ("^", "C3"), "oracle": ("*", "C4")}
    for ax, group in zip(axes[0], groups):
        mine = [c for c in cells_ if c["group"] == group]
        by_label: dict[str, list[dict]] = {}
        for c in mine:
            by_label.setdefault(c["label"], []).append(c)
        mean = lambda cs, k: 100 * statistics.fmean(c[k] for c in cs)  # noqa: E731
        rnd = sorted(((mean(cs, "upload_rate"), mean(cs, "accuracy")) for lb, cs in by_label.items()
                      if cs[0]["method"] in ("random", "distill_all") and not cs[0].get("rate_of")))
        if rnd:
            ax.plot(*zip(*rnd), "-", color="C0", marker=".", label="random (and distill-all at 100%)")
        for method, (marker, colour) in styles.items():
            for budgeted in (True, False):
                pts = sorted((mean(cs, "upload_rate"), mean(cs, "accuracy")) for lb, cs in by_label.items()
                             if cs[0]["method"] == method and (cs[0].get("budget") is not None) == budgeted)
                if pts:
                    ax.plot(*zip(*pts), linestyle=":" if budgeted else "", marker=marker, color=colour,
                            markerfacecolor=colour if budgeted else "white", markersize=7,
                            label=method + (" at budgets" if budgeted else " at its own rate"))
        ax.axhline(mean(mine, "bn_stats"), color="grey", linestyle="--", label="edge BN statistics, no cloud")
        ax.axhline(mean(mine, "no_adapt"), color="black", linestyle=":", label="no adaptation")
        ax.set_xscale("log")
        ax.set_xlabel("uploaded, % of the stream (log)")
        ax.set_ylabel("online accuracy, %")
        ax.set_title(group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("tune", "preconditions", "selection"), default="preconditions")
    p.add_argument("--classes", type=int, nargs="+", default=[100])
    p.add_argument("--severities", type=int, nargs="+", default=[5])
    p.add_argument("--protocols", nargs="+", default=["reset"], choices=PROTOCOLS)
    p.add_argument("--norms", nargs="+", default=["running", "batch"], choices=EDGE_NORMS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--corruptions", nargs="+", default=list(SUBSET), help="names, or 'all' (the 15: own groups)")
    p.add_argument("--only", nargs="+", default=[], metavar="LABEL",
                   help="run only the cells with these labels, e.g. 'random 25%%' cema random@cema (pruning)")
    p.add_argument("--cloud-preset", choices=("small", "authors"), default="small",
                   help="the cloud's constants: small (lr tuned on validation) or the authors' (B 32, lr 2.5e-4 / "
                        "2.5e-3, replay 10,000 from 256, untuned): their own groups")
    p.add_argument("--cloud-threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="the cloud's torch threads (lockstep: the edge waits while the cloud steps)")
    p.add_argument("--samples", type=int, default=5000, help="distinct test images per corruption")
    p.add_argument("--out-dir", default="benchmarks/results/cema_study")
    p.add_argument("--runs", default="runs/cema_study", help="run folders of the cells (not committed)")
    p.add_argument("--cell-timeout", type=float, default=3600.0)
    p.add_argument("--max-cells", type=int, default=0, help="stop after this many new cells (0: all)")
    p.add_argument("--summary", action="store_true", help="print the tables of the finished cells and exit")
    p.add_argument("--plot", type=Path, default=None, help="also draw accuracy vs uploads to this PNG")
    return p.parse_args(argv)


def _wait_while_paused(flag: Path) -> None:
    """Between cells, wait while ``flag`` exists: a timing benchmark can have the cores without
    stopping a cell midway (lockstep's timeouts would make that cell irreproducible)."""
    if flag.exists():
        log.info("paused: %s exists (remove it to go on)", flag)
        while flag.exists():
            time.sleep(5)
        log.info("resumed")


def main(argv: list[str] | None = None) -> int:
    unwind_on_sigterm()  # the cell's cloud / edge / Flower processes are stopped, not orphaned
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = load_done(out_dir)
    failed: list[str] = []
    if not args.summary:
        todo = [c for c in cells(args.stage, classes=args.classes, severities=args.severities,
                                 protocols=args.protocols, norms=args.norms, seeds=args.seeds,
                                 cset="all" if args.corruptions == ["all"] else "subset", only=args.only,
                                 preset=args.cloud_preset)
                if c.key not in done]
        log.info("%d cells to run (%d already done)", len(todo), len(done))
        failed = run_cells(todo[:args.max_cells or None], lambda cell: run_cell(cell, args, done), out_dir, done,
                           lambda cell, r: "accuracy {:.2f}%, uploads {:.1f}%, edge BN stats {:.2f}%".format(
                               100 * r["accuracy"], 100 * r["upload_rate"], 100 * r["bn_stats"]),
                           before_each=lambda: _wait_while_paused(out_dir / "PAUSE"))
    table = summary(done)
    print(table)
    (out_dir / "SUMMARY.md").write_text(table + "\n")
    if args.plot is not None:
        plot(done, args.plot)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
