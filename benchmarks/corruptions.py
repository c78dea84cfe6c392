"""Benchmark: vectorised ``core.corruptions.corrupt`` vs the reference package, per corruption.

The measured reason for hand-writing the corruptions: the reference (``imagecorruptions-imaug``)
corrupts one image per call, so a batch costs a Python loop of per-image calls.  This times one
batch (default 256 images of 32x32) through ``corrupt`` -- with CIFAR-10-C constants (what
``constants="auto"`` picks at 32 px) and with ImageNet-C constants (the reference's own, a
like-for-like comparison) -- against the reference looping over the same images.  Each timing is
the median over ``--repeats``; the reference's numba JIT (glass_blur) is warmed up first.

    python benchmarks/corruptions.py --out runs/bench_corruptions.json --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.corruptions import CORRUPTIONS, corrupt  # noqa: E402

logger = logging.getLogger("benchmarks.corruptions")


def synthetic_batch(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with a few discs: cheap natural-looking test images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0.2, 0.8, (n, 1, 1, 3)) \
        + rng.uniform(-0.4, 0.4, (n, 1, 1, 3)) * xx[..., None] \
        + rng.uniform(-0.4, 0.4, (n, 1, 1, 3)) * yy[..., None]
    for _ in range(3):
        cy, cx, r = (rng.uniform(lo, hi, (n, 1, 1)) for lo, hi in ((0.2, 0.8), (0.2, 0.8),
                                                                     (0.1, 0.3)))
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2)[..., None]
        base = np.where(disc, rng.uniform(0, 1, (n, 1, 1, 3)), base)
    return (np.clip(base, 0, 1) * 255).astype(np.uint8)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_loop(reference, images: np.ndarray, name: str, severity: int) -> np.ndarray:
    np.random.seed(0)
    kwargs = {"seed": 0} if name in ("glass_blur", "impulse_noise") else {}
    return np.stack([reference.corrupt(im, severity=severity, corruption_name=name, **kwargs)
                     for im in images])


def run(batch: int, size: int, severity: int, repeats: int) -> dict:
    import imagecorruptions as reference  # the optional reference package (dev extra)

    images = synthetic_batch(batch, size)
    reference.corrupt(images[0], severity=severity, corruption_name="glass_blur", seed=0)  # JIT
    rows = []
    for name in CORRUPTIONS:
        ours_cifar = median_seconds(
            lambda: corrupt(images, name, severity, seed=0, constants="cifar"), repeats)
        ours_imagenet = median_seconds(
            lambda: corrupt(images, name, severity, seed=0, constants="imagenet"), repeats)
        ref = median_seconds(lambda: reference_loop(reference, images, name, severity), repeats)
        rows.append({"corruption": name, "ours_cifar_s": ours_cifar,
                     "ours_imagenet_s": ours_imagenet, "reference_s": ref,
                     "speedup_imagenet": ref / ours_imagenet})
        logger.info("%s: ours %.4fs / %.4fs, reference %.4fs", name, ours_cifar, ours_imagenet, ref)
    totals = {key: sum(r[key] for r in rows)
              for key in ("ours_cifar_s", "ours_imagenet_s", "reference_s")}
    return {
        "config": {"batch": batch, "size": size, "severity": severity, "repeats": repeats,
                   "numpy": np.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "reference": "imagecorruptions-imaug"},
        "results": rows,
        "totals": totals,
    }


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"batch {cfg['batch']} x {cfg['size']}x{cfg['size']}, severity {cfg['severity']}, "
             f"median of {cfg['repeats']}",
             "",
             "| corruption | ours, CIFAR-C consts (ms) | ours, ImageNet-C consts (ms) | "
             "reference loop (ms) | speed-up (same consts) |",
             "|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['corruption']} | {1e3 * r['ours_cifar_s']:.1f} | "
                     f"{1e3 * r['ours_imagenet_s']:.1f} | {1e3 * r['reference_s']:.1f} | "
                     f"{r['speedup_imagenet']:.1f}x |")
    t = report["totals"]
    lines.append(f"| **all 15** | {1e3 * t['ours_cifar_s']:.1f} | {1e3 * t['ours_imagenet_s']:.1f} "
                 f"| {1e3 * t['reference_s']:.1f} | "
                 f"{t['reference_s'] / t['ours_imagenet_s']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--severity", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args.batch, args.size, args.severity, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
