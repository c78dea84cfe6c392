"""Benchmark: how long building the glyph-shift benchmark takes, and loading it from the cache.

Times ``core.data.build_glyph_shift`` without the disk cache (the work a first run does) for
``--classes`` classes over the five domains with ``--per-client`` training images per client
(default 100 classes x 5 domains x 2,000 = 10,000 images at 32 px), the median over
``--repeats``; then one build per domain alone (which styles cost what), the one-off glyph
atlas (FreeType rasterisation of every (font, char), done once per process) and a load of the
same set from a fresh on-disk cache.

    python benchmarks/glyph_shift_build.py --out runs/bench_glyph_shift.json --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import DOMAINS, build_glyph_shift, glyph_classes
from core.data.glyphs import atlas

logger = logging.getLogger("benchmarks.glyph_shift_build")


def seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(classes: int, per_client: int, image_size: int, repeats: int, seed: int = 0) -> dict:
    names = glyph_classes(classes)
    start = time.perf_counter()
    atlas(names)  # the one-off rasterisation; cached in memory for everything below
    atlas_s = time.perf_counter() - start

    def build(domains: tuple[str, ...] = DOMAINS, cache: object = False) -> object:
        return build_glyph_shift(seed, classes, image_size, train_per_client=per_client,
                                 val_per_client=0, test_per_client=0, domains=domains,
                                 cache=cache)

    total = seconds(build, repeats)
    n_images = per_client * len(DOMAINS)
    per_domain = {d: seconds(lambda d=d: build((d,)), repeats) for d in DOMAINS}
    with tempfile.TemporaryDirectory() as tmp:
        build(cache=tmp)  # writes the .npz
        load_s = seconds(lambda: build(cache=tmp), repeats)
        cache_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*.npz"))
    report = {
        "config": {"classes": classes, "domains": list(DOMAINS), "per_client": per_client,
                   "images": n_images, "image_size": image_size, "repeats": repeats,
                   "seed": seed, "numpy": np.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "cpus": os.cpu_count()},
        "atlas_seconds": atlas_s,
        "build_seconds": total,
        "images_per_second": n_images / total,
        "per_domain_seconds": per_domain,
        "cache_load_seconds": load_s,
        "cache_bytes": cache_bytes,
    }
    logger.info("built %d images in %.2f s (median of %d)", n_images, total, repeats)
    return report


def table(report: dict) -> str:
    cfg = report["config"]
    per_domain = ", ".join(f"{d} {s:.2f}" for d, s in report["per_domain_seconds"].items())
    return ("| classes | domains | images | build s (median) | images/s | atlas s | cache load s "
            "| per domain s |\n|---:|---:|---:|---:|---:|---:|---:|---|\n"
            f"| {cfg['classes']} | {len(cfg['domains'])} | {cfg['images']} | "
            f"{report['build_seconds']:.2f} | {report['images_per_second']:.0f} | "
            f"{report['atlas_seconds']:.2f} | {report['cache_load_seconds']:.3f} | {per_domain} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=100, choices=(10, 47, 100))
    parser.add_argument("--per-client", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args.classes, args.per_client, args.image_size, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
