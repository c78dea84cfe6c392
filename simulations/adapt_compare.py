"""Compare cloud-edge methods on the same streams: a Markdown table and plots.

``random`` uploads at CEMA's measured rate of the same seed (the matched-rate control METHODS.md
asks for), so CEMA runs first whenever both are requested.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from protos.config import to_mapping
from simulations.adapt import METHODS, AdaptConfig, AdaptResult, run_adapt

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("no_adapt", "bn_stats", "tent", "eata", "distill_all", "cema", "random",
                   "cema_no_replay", "cema_static", "cema_no_emin")

SHORT = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "defocus_blur": "defoc",
         "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "frost",
         "fog": "fog", "brightness": "brit", "contrast": "contr", "elastic_transform": "elast",
         "pixelate": "pixel", "jpeg_compression": "jpeg"}


def compare(base: AdaptConfig, methods: Sequence[str], seeds: Sequence[int], out: str | Path) -> dict:
    out = Path(out)
    if unknown := [m for m in methods if m not in METHODS]:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    order = sorted(methods, key=lambda m: (m == "random", methods.index(m)))
    if "random" in order and "cema" not in order:
        raise ValueError("'random' is matched to CEMA's upload rate: include 'cema'")
    runs: dict[str, list[AdaptResult]] = {m: [] for m in order}
    for seed in seeds:
        for method in order:
            cfg = replace(base, method=method, seed=seed)
            if method == "random":
                cfg = cfg.with_random_rate(runs["cema"][-1].upload_rate)
            log.info("== %s, seed %d ==", method, seed)
            runs[method].append(run_adapt(cfg, out / f"{method}_seed{seed}"))
    summary = {"methods": list(methods), "seeds": list(seeds), "config": to_mapping(base),
               "runs": {m: [_brief(r) for r in rs] for m, rs in runs.items()}}
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    table = markdown_table(runs, list(base.corruptions), [m for m in methods])
    (out / "compare.md").write_text(table + "\n")
    plot(runs, out / "compare.png")
    return summary


def _brief(r: AdaptResult) -> dict:
    d = r.to_dict()
    keys = ("method", "accuracy", "no_adapt_accuracy", "seen", "uploaded", "upload_rate", "bytes_up",
            "bytes_down", "versions_applied", "timing_s")
    return {k: d[k] for k in keys}


def _fmt(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f}±{100 * statistics.stdev(values):.1f}"


def markdown_table(runs: dict[str, list[AdaptResult]], corruptions: list[str], methods: list[str]) -> str:
    head = ["method", *[SHORT.get(c, c) for c in corruptions], "mean", "uploaded %", "MB up", "MB down"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        rs = runs[m]
        cells = [_fmt([r.accuracy.per_corruption.get(c, float("nan")) for r in rs]) for c in corruptions]
        lines.append("| " + " | ".join([
            m, *cells, _fmt([r.accuracy.overall for r in rs]), _fmt([r.upload_rate for r in rs]),
            f"{statistics.fmean(r.bytes_up for r in rs) / 1e6:.2f}",
            f"{statistics.fmean(r.bytes_down for r in rs) / 1e6:.2f}"]) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[AdaptResult]], path: Path) -> None:
    """Mean online accuracy vs upload rate (one point per method and seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, rs in runs.items():
        ax.scatter([100 * r.upload_rate for r in rs], [100 * r.accuracy.overall for r in rs], label=m)
    ax.set_xlabel("uploaded samples (%)")
    ax.set_ylabel("online accuracy (%)")
    ax.set_title("cloud-edge adaptation: accuracy vs uploads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
