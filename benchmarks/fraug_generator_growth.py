"""How FRAug's generator objective grows over the study's 300-round runs (issue 11's finding).

The generator maximises its distance to the class prototypes, L_G = CE − λ_G·MSE(G(z, y), μ_y) —
the paper's and the authors' code's form. Nothing bounds that MSE (G ends in BatchNorm + ReLU,
whose affine weights grow freely), so it grows geometrically; this script reads the per-round
FRAug metrics every finished FRAug run of ``benchmarks/fraug_study.py`` logged (the clients' mean
of ``g_dist``, ``residual_ratio`` and the prototype-anchored label consistency: the share of
synthetic embeddings the head gives their label, low by design), the largest finite train loss
among the replies the server accepted (the recorder keeps only those: a refused blow-up is not in
it, an accepted one is), and the server's "rejected the update" warnings,
and writes one JSON row per run plus a Markdown table.

    python benchmarks/fraug_generator_growth.py                 # reads runs/fraug_study/
    python benchmarks/fraug_generator_growth.py --out benchmarks/results/fraug_generator_growth/generator_growth.json

Reads only run folders (``results.json``, ``run.log``), which are not committed: the JSON it writes is.
A row already in ``--out`` whose run folder is not here (a study continued on another machine) is
kept as it was, and the log says so; a run folder here always replaces its row.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("bench.fraug_generator_growth")
AT_ROUNDS = (1, 50, 100, 200, 300)
_REJECTED = re.compile(r"round (\d+): rejected the update")


def _client_mean(record: dict[str, Any], key: str) -> float | None:
    values = [c["fraug"][key] for c in record["clients"].values() if c.get("fraug") and key in c["fraug"]]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def max_train_loss(history: Sequence[dict[str, Any]]) -> tuple[float, int] | None:
    """The largest finite train loss of an accepted reply, and its round (a NaN loss is stored as
    null, and skipped here)."""
    losses = [(c["train_loss"], h["round"]) for h in history for c in h["clients"].values()
              if c.get("train_loss") is not None and math.isfinite(c["train_loss"])]
    return max(losses) if losses else None


def growth(run_dir: Path) -> dict[str, Any]:
    """One FRAug run's generator distance over rounds, its doubling time, and its failures."""
    results = json.loads((run_dir / "results.json").read_text())
    history = results["history"]
    by_round = {h["round"]: h for h in history}
    g = {r: _client_mean(by_round[r], "g_dist") for r in AT_ROUNDS if r in by_round}
    a, b = g.get(50), g.get(200)  # doubling time over rounds 50 -> 200: past the start-up, before any blow-up
    doubling = 150 * math.log(2) / math.log(b / a) if a and b and b > a else None
    rejected: list[int] = []
    log_path = run_dir / "run.log"
    if log_path.is_file():
        rejected = sorted({int(m.group(1)) for m in _REJECTED.finditer(log_path.read_text(errors="replace"))})
    chance = 1 / max(1, results["config"].get("classes", 10))
    collapsed, peak = None, 0.0
    for h in history:  # back to chance after having learnt something
        acc = h["mean_accuracy"]
        if acc is None:
            continue
        if peak >= 3 * chance and acc <= 1.5 * chance:
            collapsed = h["round"]
            break
        peak = max(peak, acc)
    worst = max_train_loss(history)
    consistency = {str(r): _client_mean(by_round[r], "label_consistency_proto") for r in AT_ROUNDS if r in by_round}
    return {"run": run_dir.name, "g_dist": {str(r): v for r, v in g.items()}, "doubling_rounds": doubling,
            "label_consistency_proto": consistency,
            "max_residual_ratio": max((v for h in history if (v := _client_mean(h, "residual_ratio")) is not None),
                                      default=None),
            "max_train_loss": worst[0] if worst else None, "max_train_loss_round": worst[1] if worst else None,
            "first_rejected_round": rejected[0] if rejected else None, "rejected_rounds": len(rejected),
            "collapsed_at_round": collapsed, "final_mean_accuracy": history[-1]["mean_accuracy"]}


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.1e}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| run | " + " | ".join(f"g_dist @{r}" for r in AT_ROUNDS)
             + " | doubles every (rounds) | label consistency (proto) @100 / 200 / 300"
             + " | max train loss (round) | first rejected update | collapsed at | final acc |",
             "|---|" + "---|" * (len(AT_ROUNDS) + 6)]
    for row in rows:
        lines.append(f"| {row['run']} | " + " | ".join(_fmt(row["g_dist"].get(str(r))) for r in AT_ROUNDS)
                     + f" | {_fmt(row['doubling_rounds'])} | "
                     + " / ".join(_fmt(row["label_consistency_proto"].get(str(r))) for r in (100, 200, 300))
                     + f" | {_fmt(row['max_train_loss'])} ({row['max_train_loss_round'] or '–'})"
                     + f" | {row['first_rejected_round'] or '–'} | "
                     f"{row['collapsed_at_round'] or '–'} | {100 * row['final_mean_accuracy']:.1f} |")
    return "\n".join(lines) + "\n"


def merge_rows(computed: Sequence[dict[str, Any]], previous: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows computed here, plus the previous rows of runs whose folders are not here, by run name."""
    here = {row["run"] for row in computed}
    kept = [row for row in previous if row["run"] not in here]
    for row in kept:
        log.info("kept %s from the previous output (no run folder here)", row["run"])
    return sorted([*computed, *kept], key=lambda row: row["run"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/fraug_study"), help="the study's run folders")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default: print only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    dirs = sorted(d for d in args.runs.glob("*-main*-fraug-seed*") if (d / "results.json").is_file())
    previous = json.loads(args.out.read_text())["runs"] if args.out and args.out.is_file() else []
    if not dirs and not previous:
        log.error("no finished FRAug runs under %s", args.runs)
        return 1
    computed = []
    for i, d in enumerate(dirs, 1):
        computed.append(growth(d))
        log.info("[%d/%d] %s", i, len(dirs), d.name)
    rows = merge_rows(computed, previous)
    text = table(rows)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python benchmarks/fraug_generator_growth.py --out " + str(args.out),
                                        "runs": rows}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
