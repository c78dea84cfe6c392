"""Clean and corrupted accuracy of the built-in teacher and edge model (trained on first use).

    python benchmarks/teacher_robustness.py --out runs/teacher_robustness.json [--cache DIR]

Both models are evaluated on the digits-shift TEST splits of all clients, clean and under each of
the 15 corruptions at severity 5, with running BN statistics (no adaptation) and with the
statistics of each 64-sample batch (forward-only BN adaptation). CEMA needs the teacher to be
clearly more robust than the edge model; this script is where that is measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/teacher_robustness.json"))
    parser.add_argument("--cache", type=Path, help="model cache (default: $FEDSHIFT_CACHE or ~/.cache/fedshift)")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from core.data import make_digits_shift
    from core.teacher import DEFAULT_EDGE, DEFAULT_TEACHER, cached_model, robustness_report, eval_split

    results = {}
    for role, config in (("edge", DEFAULT_EDGE), ("teacher", DEFAULT_TEACHER)):
        start = time.perf_counter()
        model, path = cached_model(config, args.cache)
        meta = path.with_suffix(".json")
        train_info = json.loads(meta.read_text()) if meta.is_file() else {}
        split = eval_split(make_digits_shift(config.data_seed, config.image_size))
        report = robustness_report(model, split, severity=args.severity)
        report.update(model=config.model, params=sum(p.numel() for p in model.parameters()),
                      weights=str(path), train_seconds=train_info.get("train_seconds"),
                      load_or_train_and_eval_seconds=round(time.perf_counter() - start, 1))
        results[role] = report
        logging.info("%s (%s): clean %.3f / %.3f, corrupted mean %.3f (eval) / %.3f (batch stats)", role,
                     config.model, report["clean"]["eval"], report["clean"]["batch_stats"],
                     report["corrupted_mean_eval"], report["corrupted_mean_batch_stats"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"{'corruption':<20}{'edge eval':>10}{'edge BN':>10}{'teach eval':>11}{'teach BN':>10}")
    for name in results["edge"]["corrupted"]:
        e, t = results["edge"]["corrupted"][name], results["teacher"]["corrupted"][name]
        print(f"{name:<20}{e['eval']:>10.3f}{e['batch_stats']:>10.3f}{t['eval']:>11.3f}{t['batch_stats']:>10.3f}")
    for key, label in (("clean", "clean"),):
        e, t = results["edge"][key], results["teacher"][key]
        print(f"{label:<20}{e['eval']:>10.3f}{e['batch_stats']:>10.3f}{t['eval']:>11.3f}{t['batch_stats']:>10.3f}")
    print(f"{'corrupted mean':<20}{results['edge']['corrupted_mean_eval']:>10.3f}"
          f"{results['edge']['corrupted_mean_batch_stats']:>10.3f}{results['teacher']['corrupted_mean_eval']:>11.3f}"
          f"{results['teacher']['corrupted_mean_batch_stats']:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
