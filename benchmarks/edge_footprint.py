"""What an edge costs on a board: memory, start-up, speed per thread count, disk, bytes per update.

For each model (default: the default edge model ``edge_cnn`` and ``timm:resnet18``, random
weights, ``--image-size`` px), exported the way ``fedshift export`` does:

- **memory**: resident set (``VmRSS``) of a fresh edge process after loading the model and after
  ``--predictions`` batches, and its peak (``VmHWM``). The child imports only ``edge.runtime`` and
  checks that neither torch nor ``core`` was imported (and records whether ORT's Python binding
  was: the C API path does not load it);
- **start-up**: process start (the parent's clock just before it spawns the child) → first logits,
  with the child's own split (interpreter + imports, model load, first prediction);
- **speed**: img/s with 1 and 2 ONNX Runtime threads, each in its own child;
- **disk**: the model file, and the base install (``pip install fedshift``: fedshift's requirements
  and theirs, without extras) summed from each installed distribution's ``RECORD`` through
  :mod:`importlib.metadata` (the on-disk size of every listed file), plus fedshift's own code
  (the edge's packages ``edge`` + ``protos``, and every package the wheel carries);
- **bytes per update**: the serialized ``ParameterUpdate`` carrying the whole normalization state,
  as the cloud sends it.

Timed figures are medians over ``--repeats`` child processes.

    python benchmarks/edge_footprint.py --out runs/bench/edge_footprint.json
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.edge_footprint")

EDGE_PACKAGES = ("edge", "protos")  # what `fedshift edge` runs
WHEEL_PACKAGES = ("core", "edge", "protos", "server", "client", "simulations")  # pyproject's packages.find

# The child: a fresh interpreter that imports only the edge runtime. It prints one JSON line.
CHILD = r"""
import json, os, sys, time
root, model = sys.argv[1], sys.argv[2]
threads, batch, predictions = (int(a) for a in sys.argv[3:6])
t0 = time.perf_counter()
sys.path.insert(0, root)

def status(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, KiB on Linux

import numpy as np
from edge.runtime import EdgeRuntime
t_import = time.perf_counter()
rt = EdgeRuntime(model, threads=threads)
t_load = time.perf_counter()
rss_load = status("VmRSS")
c, h, w = rt.input_shape
images = np.random.default_rng(0).integers(0, 256, (batch, h, w, c), dtype=np.uint8)
logits = rt.predict(images)
first_wall, t_first = time.time(), time.perf_counter()
assert logits.shape == (batch, rt.num_classes)
start = time.perf_counter()
for _ in range(predictions):
    rt.predict(images)
elapsed = time.perf_counter() - start
bad = sorted(m for m in ("torch", "core", "server", "client", "simulations") if m in sys.modules)
assert not bad, f"the edge process imported {bad}"
print(json.dumps({
    "first_logits_unix": first_wall, "imports_s": t_import - t0, "load_s": t_load - t_import,
    "first_predict_s": t_first - t_load, "img_per_s": batch * predictions / elapsed if predictions else None,
    "rss_after_load_bytes": rss_load, "rss_after_predictions_bytes": status("VmRSS"), "rss_peak_bytes": status("VmHWM"),
    "backend": rt.backend, "ort_python_binding_loaded": "onnxruntime" in sys.modules, "torch_imported": False,
    "predictions": predictions,
}))
"""


# ---------------------------------------------------------------- processes

def run_child(model: Path, threads: int, args: argparse.Namespace) -> dict:
    """One fresh edge process; returns its report plus the start-up time seen from outside."""
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(model), str(threads), str(args.batch),
                           str(args.predictions)], capture_output=True, text=True, timeout=args.child_timeout_s,
                          check=False, env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"edge child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["startup_s"] = report["first_logits_unix"] - spawned
    return report


def _median(reports: list[dict], key: str) -> float | None:
    values = [r[key] for r in reports if r.get(key) is not None]
    return statistics.median(values) if values else None


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    import torch

    from core.export import export_onnx
    from core.models import create_model
    from edge.runtime import EdgeRuntime
    from protos.codec import encode_state
    from protos.fedshift.v1 import edge_pb2 as pb

    torch.manual_seed(0)
    model = create_model(name, 10, image_size=args.image_size).eval()
    path = workdir / f"{name.replace(':', '_')}.onnx"
    export_onnx(model, path, (3, args.image_size, args.image_size), model_name=name)
    with EdgeRuntime(path) as rt:
        state = rt.norm_state()
    update = pb.ParameterUpdate(version=123456, tensors=encode_state(state), created_unix=time.time(), cloud_step=1000,
                                episode=3)
    per_threads: dict[str, list[dict]] = {str(t): [] for t in args.threads}
    for rep in range(args.repeats):
        for t in args.threads:  # alternate so machine noise hits both alike
            per_threads[str(t)].append(run_child(path, t, args))
        log.info("%s: repeat %d/%d", name, rep + 1, args.repeats)
    base = per_threads[str(args.threads[0])]  # memory and start-up: the edge's default, the first thread count
    mib = 2 ** 20
    return {
        "model": name,
        "image_size": args.image_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_file_bytes": path.stat().st_size,
        "update_bytes": update.ByteSize(),
        "norm_floats": int(sum(v.size for v in state.values())),
        "memory_threads": args.threads[0],
        "rss_after_load_mb": _median(base, "rss_after_load_bytes") / mib,
        "rss_after_predictions_mb": _median(base, "rss_after_predictions_bytes") / mib,
        "rss_peak_mb": _median(base, "rss_peak_bytes") / mib,
        "startup_s": _median(base, "startup_s"),
        "startup_split_s": {k: _median(base, k) for k in ("imports_s", "load_s", "first_predict_s")},
        "img_per_s": {t: _median(reps, "img_per_s") for t, reps in per_threads.items()},
        "backend": base[0]["backend"],
        "ort_python_binding_loaded": any(r["ort_python_binding_loaded"] for r in base),
        "torch_imported": any(r["torch_imported"] for r in base),
        "children": per_threads,
    }


# ---------------------------------------------------------------- install size

def _name(requirement: str) -> str:
    return re.split(r"[\s;\[<>=!~(]", requirement.strip(), maxsplit=1)[0]


def _needed(requirement: str) -> bool:
    """A requirement of the base install: no extra, and its marker holds here."""
    if ";" not in requirement:
        return True
    marker = requirement.split(";", 1)[1]
    if "extra" in marker:
        return False
    try:
        from packaging.markers import Marker
    except ImportError:  # without packaging, count it (an over-estimate, never an omission)
        return True
    return Marker(marker).evaluate()


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution_bytes(dist: md.Distribution) -> tuple[int, int]:
    """(bytes, files) of every file the distribution's RECORD lists, measured on disk."""
    total = files = 0
    for f in dist.files or ():
        p = Path(dist.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
            files += 1
        elif f.size:
            total += int(f.size)
            files += 1
    return total, files


def _code_bytes(packages: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for pkg in packages for p in (ROOT / pkg).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".proto", ".pyi", ".typed"))


def install_size() -> dict:
    """The base install: fedshift's requirements and theirs (no extras), from RECORD files."""
    todo = [r for r in (md.requires("fedshift") or []) if _needed(r)]
    seen: dict[str, dict] = {}
    while todo:
        name = _name(todo.pop())
        if _key(name) in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            seen[_key(name)] = {"name": name, "version": None, "bytes": 0, "files": 0}
            continue
        size, files = _distribution_bytes(dist)
        seen[_key(name)] = {"name": dist.metadata["Name"], "version": dist.version, "bytes": size, "files": files}
        todo += [r for r in (dist.requires or []) if _needed(r)]
    deps = sorted(seen.values(), key=lambda d: -d["bytes"])
    deps_bytes = sum(d["bytes"] for d in deps)
    edge_code, wheel_code = _code_bytes(EDGE_PACKAGES), _code_bytes(WHEEL_PACKAGES)
    return {
        "method": "importlib.metadata: the on-disk size of every file listed in each distribution's RECORD, for "
                  "fedshift's requirements without extras and their requirements, recursively; fedshift's own "
                  "code measured in the source tree (.py/.proto files)",
        "distributions": deps,
        "dependencies_bytes": deps_bytes,
        "fedshift_edge_code_bytes": edge_code,
        "fedshift_wheel_code_bytes": wheel_code,
        "base_install_bytes": deps_bytes + wheel_code,
        "edge_needs_bytes": deps_bytes + edge_code,
    }


# ---------------------------------------------------------------- report

def table(results: list[dict], install: dict, threads: list[int]) -> str:
    mib = 2 ** 20
    head = " | ".join(f"img/s, {t} thread{'s' if t > 1 else ''}" for t in threads)
    lines = [f"| model | model file MB | bytes per update | RSS after load MB | RSS after N predictions MB | "
             f"start-up to first logits s | {head} |",
             "|---|---|---|---|---|---|" + "---|" * len(threads)]
    for r in results:
        speeds = " | ".join(f"{r['img_per_s'][str(t)]:,.0f}" for t in threads)
        lines.append(f"| {r['model']} | {r['model_file_bytes'] / mib:.2f} | {r['update_bytes']:,} | "
                     f"{r['rss_after_load_mb']:.0f} | {r['rss_after_predictions_mb']:.0f} | {r['startup_s']:.2f} | "
                     f"{speeds} |")
    deps = ", ".join(f"{d['name']} {d['bytes'] / mib:.1f}" for d in install["distributions"])
    lines += ["", f"base install: {install['base_install_bytes'] / mib:.1f} MB = dependencies "
              f"{install['dependencies_bytes'] / mib:.1f} MB ({deps}) + fedshift code "
              f"{install['fedshift_wheel_code_bytes'] / mib:.2f} MB (edge + protos: "
              f"{install['fedshift_edge_code_bytes'] / mib:.2f} MB)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["edge_cnn", "timm:resnet18"])
    p.add_argument("--image-size", type=int, default=32, help="input H = W for every model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="ONNX Runtime thread counts to time; memory and start-up come from the first")
    p.add_argument("--predictions", type=int, default=20, help="batches each child predicts after the first")
    p.add_argument("--repeats", type=int, default=3, help="child processes per model and thread count")
    p.add_argument("--child-timeout-s", type=float, default=600.0)
    p.add_argument("--note", default="", help="free text recorded with the settings (e.g. what else loads the machine)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/edge_footprint.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(name, args, Path(tmp)) for name in args.models]
    install = install_size()
    report = {
        "benchmark": "edge_footprint",
        "command": shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": md.version("onnxruntime"), "load_average_1m_start": load_start[0],
                    "load_average_1m_end": os.getloadavg()[0]},
        "results": results,
        "install": install,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(results, install, args.threads))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
