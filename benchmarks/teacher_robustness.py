"""Clean and corrupted accuracy of the built-in edge model and teacher, per built-in dataset.

    python benchmarks/teacher_robustness.py                       # every cell, resumable
    python benchmarks/teacher_robustness.py --cells glyph-shift:10 --cache DIR

One cell = (dataset, classes, role): the built-in model of that role is trained once (cached,
``core.teacher.builtin_config``) and evaluated on the pooled TEST splits of all clients, clean and
under each of the 15 corruptions at severities 5 and 3, with running BN statistics (no
adaptation) and with the statistics of each 64-sample batch (forward-only BN adaptation). Each
finished cell is one JSON under ``--out-dir``; cells already there are skipped, so a later run
(or a fresh machine with the committed JSON) continues where this one stopped. The summary table
is printed and written as ``summary.md``. CEMA's gain is what the teacher's robustness can
transfer: the column that matters is the teacher's corrupted accuracy against the edge model's
with batch statistics.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

CELLS = ("digits-shift:10", "glyph-shift:10", "glyph-shift:100")
ROLES = ("edge", "teacher")
SEVERITIES = (5, 3)
log = logging.getLogger("bench.teacher_robustness")


def run_cell(dataset: str, classes: int, role: str, cache: Path | None) -> dict:
    from core.data.builtin import BuiltinData
    from core.teacher import builtin_config, cached_model, eval_split, robustness_report

    data = BuiltinData(dataset, classes)
    config = builtin_config(role, data)
    start = time.perf_counter()
    model, path = cached_model(config, cache)
    meta = path.with_suffix(".json")
    train_seconds = json.loads(meta.read_text()).get("train_seconds") if meta.is_file() else None
    split = eval_split(data.make(config.data_seed, config.image_size))
    out = {"dataset": dataset, "classes": classes, "role": role, "model": config.model,
           "model_kwargs": dict(config.model_kwargs), "epochs": config.epochs, "augment": list(config.augment),
           "colour_jitter": config.colour_jitter, "params": sum(p.numel() for p in model.parameters()),
           "train_seconds": train_seconds, "weights": path.name, "test_samples": len(split), "severity": {}}
    for severity in SEVERITIES:
        report = robustness_report(model, split, severity=severity)
        out["clean"] = report["clean"]
        out["severity"][str(severity)] = {"mean_eval": report["corrupted_mean_eval"],
                                          "mean_batch_stats": report["corrupted_mean_batch_stats"],
                                          "per_corruption": report["corrupted"]}
        log.info("%s %d %s s%d: clean %.3f, corrupted %.3f (running) / %.3f (batch stats)", dataset, classes,
                 role, severity, report["clean"]["eval"], report["corrupted_mean_eval"],
                 report["corrupted_mean_batch_stats"])
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def summary_table(cells: dict[tuple[str, int, str], dict]) -> str:
    head = ("| dataset | classes | model | params | train s | clean run / BN | sev 5 run / BN | sev 3 run / BN |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for (dataset, classes, role), c in sorted(cells.items()):
        pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
        s5, s3 = c["severity"]["5"], c["severity"]["3"]
        name = f"{role}: {c['model']}" + (f" w{c['model_kwargs']['width']}" if "width" in c["model_kwargs"] else "")
        lines.append(f"| {dataset} | {classes} | {name} | {c['params'] / 1e3:.0f}k | {c['train_seconds'] or 0:.0f} | "
                     f"{pct(c['clean']['eval'])} / {pct(c['clean']['batch_stats'])} | "
                     f"{pct(s5['mean_eval'])} / {pct(s5['mean_batch_stats'])} | "
                     f"{pct(s3['mean_eval'])} / {pct(s3['mean_batch_stats'])} |")
    gaps = []
    for dataset, classes in sorted({(d, k) for d, k, _ in cells}):
        t, e = cells.get((dataset, classes, "teacher")), cells.get((dataset, classes, "edge"))
        if t and e:
            for sev in ("5", "3"):
                best_t = max(t["severity"][sev]["mean_eval"], t["severity"][sev]["mean_batch_stats"])
                gaps.append(f"{dataset} {classes} classes, severity {sev}: teacher (best of running/BN) − edge with "
                            f"BN statistics = {100 * (best_t - e['severity'][sev]['mean_batch_stats']):+.1f} points")
    return "\n".join(lines + ([""] + gaps if gaps else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/teacher_robustness"))
    parser.add_argument("--cells", nargs="+", default=list(CELLS), help="DATASET:CLASSES (default: all)")
    parser.add_argument("--roles", nargs="+", default=list(ROLES), choices=ROLES)
    parser.add_argument("--cache", type=Path, help="model cache (default: $FEDSHIFT_CACHE or ~/.cache/fedshift)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for cell in args.cells:
        dataset, classes = cell.split(":")
        for role in args.roles:
            path = args.out_dir / f"{dataset}-{classes}-{role}.json"
            if path.is_file():
                log.info("%s: done already, skipped", path.name)
                continue
            log.info("cell %s %s %s …", dataset, classes, role)
            result = run_cell(dataset, int(classes), role, args.cache)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(path)
    cells = {}
    for p in sorted(args.out_dir.glob("*.json")):
        c = json.loads(p.read_text())
        cells[(c["dataset"], c["classes"], c["role"])] = c
    table = summary_table(cells)
    (args.out_dir / "summary.md").write_text(
        "Command: `python benchmarks/teacher_robustness.py`\n\n" + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
