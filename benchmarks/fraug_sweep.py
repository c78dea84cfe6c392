"""Where does FRAug's augmentation help? Variants × seeds, paired against FedBN per seed.

Each variant is a set of run-config overrides for FRAug; variants that change the data or the
federation (images per client, number of clients) also rerun FedBN under the same settings, the
others are paired with the FedBN runs of an existing ``fedshift fl compare`` directory
(``--baseline``). Selection is by the **validation** paired difference; test is reported beside
it. Label consistency (share of synthetic embeddings the head assigns to their label) and the
RTNet residual size are read from the runs' final round.

    python benchmarks/fraug_sweep.py --baseline runs/fl-compare --out runs/fraug-sweep --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.fl_config import FLConfig, FLResult  # noqa: E402
from simulations.fl_role import FLRun  # noqa: E402

log = logging.getLogger("fraug_sweep")

# name -> (FRAug overrides, whether FedBN must be rerun with the same overrides)
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "interp-g0.05": ({"fraug-interpolate": True, "fraug-gamma": 0.05}, False),
    "no-final-bn": ({"fraug-rtnet-final-bn": False}, False),
    "lambda-t-10": ({"fraug-lambda-t": 10.0}, False),
    "warmup8-lam0.25": ({"fraug-warmup-rounds": 8, "fraug-lambda-max": 0.25}, False),
    "latent-16": ({"fraug-latent-dim": 16}, False),
    "lambda-0.1": ({"fraug-lambda-max": 0.1}, False),
    "30-images": ({"train-per-client": 30, "local-steps": 7}, True),  # same SGD steps as the default
    "10-clients": ({"clients": 10}, True),
}


def _load(run_dir: Path) -> FLResult:
    return FLResult.read(run_dir / "results.json")


def _paired(fraug: dict[int, FLResult], fedbn: dict[int, FLResult], key: str) -> list[float]:
    diffs = []
    for k in sorted(fraug):
        if k in fedbn:
            a, b = getattr(fraug[k], key), getattr(fedbn[k], key)
            diffs.append(a - b if a is not None and b is not None else float("nan"))
    return diffs


def _mean_of(rows: list[dict[str, float | None]], key: str) -> float:
    """Mean of ``key`` over rows (missing or null: NaN, so it shows)."""
    return float(np.mean(np.asarray([row.get(key) for row in rows], dtype=float)))


def _ms(xs: list[float]) -> str:
    a = np.asarray(xs) * 100
    return f"{a.mean():+.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="a `fedshift fl compare` output directory")
    p.add_argument("--out", type=Path, default=Path("runs/fraug-sweep"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from simulations.fl_compare import run_comparison

    rows = []
    base_fedbn = {k: _load(a.baseline / f"fedbn-seed{k}") for k in a.seeds}
    base_fraug = {k: _load(a.baseline / f"fraug-seed{k}") for k in a.seeds}
    variants = [("default", {}, False)] + [(n, *VARIANTS[n]) for n in a.variants]
    for name, sets, rerun_fedbn in variants:
        if name == "default":
            fraug, fedbn = base_fraug, base_fedbn
        else:
            out = a.out / name
            run_comparison(FLRun(fl=FLConfig.from_run_config(sets)),
                           strategies=["fedbn", "fraug"] if rerun_fedbn else ["fraug"], seeds=a.seeds, out=out,
                           force=a.force)
            fraug = {k: _load(out / f"fraug-seed{k}") for k in a.seeds}
            fedbn = {k: _load(out / f"fedbn-seed{k}") for k in a.seeds} if rerun_fedbn else base_fedbn
        last = [(fraug[k].history[-1].fraug if fraug[k].history else None) or {} for k in a.seeds]
        row = {
            "variant": name, "overrides": sets, "fedbn_rerun": rerun_fedbn,
            "fraug_test": [fraug[k].mean_accuracy for k in a.seeds],
            "fedbn_test": [fedbn[k].mean_accuracy for k in a.seeds],
            "diff_val": _paired(fraug, fedbn, "mean_val_accuracy"),
            "diff_test": _paired(fraug, fedbn, "mean_accuracy"),
            "label_consistency_real": _mean_of(last, "label_consistency_real"),
            "label_consistency_proto": _mean_of(last, "label_consistency_proto"),
            "residual_ratio": _mean_of(last, "residual_ratio"),
        }
        rows.append(row)
        log.info("%s: FRAug − FedBN val %s, test %s (pp); label consistency %.2f / %.2f", name,
                 _ms(row["diff_val"]), _ms(row["diff_test"]), row["label_consistency_real"],
                 row["label_consistency_proto"])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fraug_sweep.json").write_text(json.dumps({"seeds": a.seeds, "rows": rows}, indent=1) + "\n")
    lines = ["| variant | overrides | FRAug test | FedBN test | FRAug − FedBN val (pp) | FRAug − FedBN test (pp) "
             "| label consistency real / proto | residual / embedding |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ov = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "code defaults"
        fraug_test, fedbn_test = (100 * np.mean(np.asarray(r[k], dtype=float)) for k in ("fraug_test", "fedbn_test"))
        lines.append(f"| {r['variant']} | {ov} | {fraug_test:.1f} | "
                     f"{fedbn_test:.1f} | {_ms(r['diff_val'])} | {_ms(r['diff_test'])} | "
                     f"{r['label_consistency_real']:.2f} / {r['label_consistency_proto']:.2f} | "
                     f"{r['residual_ratio']:.2f} |")
    (a.out / "fraug_sweep.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", a.out / "fraug_sweep.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
