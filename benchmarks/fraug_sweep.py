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


def _namespace(seeds: list[int], strategies: list[str], sets: dict[str, Any], force: bool) -> argparse.Namespace:
    return argparse.Namespace(seeds=seeds, strategies=strategies, sets=[f"{k}={v}" for k, v in sets.items()],
                              rounds=None, clients=None, num_cpus=None, cpus_per_client=1, force=force)


def _load(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def _paired(fraug: dict[int, dict], fedbn: dict[int, dict], key: str) -> list[float]:
    return [fraug[k][key] - fedbn[k][key] for k in sorted(fraug) if k in fedbn]


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
            run_comparison(_namespace(a.seeds, ["fedbn", "fraug"] if rerun_fedbn else ["fraug"], sets, a.force), out)
            fraug = {k: _load(out / f"fraug-seed{k}") for k in a.seeds}
            fedbn = {k: _load(out / f"fedbn-seed{k}") for k in a.seeds} if rerun_fedbn else base_fedbn
        last = [fraug[k]["history"][-1].get("fraug", {}) for k in a.seeds]
        row = {
            "variant": name, "overrides": sets, "fedbn_rerun": rerun_fedbn,
            "fraug_test": [fraug[k]["mean_accuracy"] for k in a.seeds],
            "fedbn_test": [fedbn[k]["mean_accuracy"] for k in a.seeds],
            "diff_val": _paired(fraug, fedbn, "mean_val_accuracy"),
            "diff_test": _paired(fraug, fedbn, "mean_accuracy"),
            "label_consistency_real": float(np.mean([x.get("label_consistency_real", np.nan) for x in last])),
            "label_consistency_proto": float(np.mean([x.get("label_consistency_proto", np.nan) for x in last])),
            "residual_ratio": float(np.mean([x.get("residual_ratio", np.nan) for x in last])),
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
        lines.append(f"| {r['variant']} | {ov} | {100 * np.mean(r['fraug_test']):.1f} | "
                     f"{100 * np.mean(r['fedbn_test']):.1f} | {_ms(r['diff_val'])} | {_ms(r['diff_test'])} | "
                     f"{r['label_consistency_real']:.2f} / {r['label_consistency_proto']:.2f} | "
                     f"{r['residual_ratio']:.2f} |")
    (a.out / "fraug_sweep.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", a.out / "fraug_sweep.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
