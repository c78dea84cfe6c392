"""Edge inference speed and normalization-update cost, measured side by side in one run.

**Speed.** For each model: torch eager vs a plain fused ONNX export (what ``torch.onnx.export``
gives an eval model: BN folded away, no updates possible) vs fedshift's export in both norm modes
(``initializers``: fused at session creation, updated by rebuilding the session; ``inputs``: BN
tensors fed per run), the initializers one both through ORT's C API (the runtime's default) and
through the Python binding. Variants are timed round-robin within each repeat (the order rotating
between repeats) so machine noise hits them alike; figures are medians over repeats, and the
ratios to the fused export are given both as a ratio of medians and as the median of each
repeat's own ratio (samples seconds apart, which cancels the slower drifts of a shared machine).

**Updates.** Each update path runs with a thread predicting in a loop (as an edge does) and a
pure-Python probe thread, and applies a new random normalization state every ``--update-settle-s``:

- ``sync_python``: the previous behaviour (session rebuilt inside ``apply``, Python binding);
- ``background_python``: rebuilt on the runtime's builder thread, Python binding;
- ``background_capi``: rebuilt on the builder thread through ORT's C API — the default;
- ``inputs``: the ``--norm-as-inputs`` export (no rebuild; the tensors are fed with every run).

Per update: **blocking** = how long ``apply`` blocks its caller; **in force** = from the ``apply``
call to the swap (from then on every prediction uses it; taken by a version listener);
**first prediction** = from the ``apply`` call to the end of the first prediction that returned
the new version. Predictions overlapping an update (``apply`` → first prediction) are compared
with the others; the probe's largest gap between wake-ups (0.5 ms sleeps) during updates shows how
long the GIL (or the CPU) was taken from other Python threads. The paths rotate within each repeat.
``max_swap_hold_ms`` / ``mean_swap_hold_ms``: how long the runtime's lock was held by a swap.

**Session options.** Build time and speed of a plain session per ``graph_optimization_level``
(would a cheaper rebuild be worth its inference cost?).

    python benchmarks/edge_runtime.py --out runs/bench/edge_runtime.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from core.export import export_onnx  # noqa: E402
from core.models import create_model  # noqa: E402
from core.norm import get_norm_state  # noqa: E402
from edge.runtime import EdgeRuntime  # noqa: E402

log = logging.getLogger("bench.edge_runtime")
WAIT_S = 120.0


@dataclass(frozen=True)
class UpdatePath:
    """One way of putting an update in force."""

    name: str
    backend: str
    background: bool
    norm_as_inputs: bool = False


PATHS = (UpdatePath("sync_python", "python", False), UpdatePath("background_python", "python", True),
         UpdatePath("background_capi", "auto", True), UpdatePath("inputs", "auto", True, norm_as_inputs=True))


# ---------------------------------------------------------------- speed

def _fused_bytes(model: torch.nn.Module, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, *shape),), buf, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return buf.getvalue()


def _session(data: bytes, threads: int, level: str = "ORT_ENABLE_ALL") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _time(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def bench_speed(model: torch.nn.Module, files: dict[str, Path], fused: bytes, x: np.ndarray,
                args: argparse.Namespace, name: str) -> dict[str, list[float]]:
    runtimes = {"fedshift_initializers": EdgeRuntime(files["initializers"], threads=args.threads),
                "fedshift_initializers_pybind": EdgeRuntime(files["initializers"], threads=args.threads,
                                                            backend="python"),
                "fedshift_inputs": EdgeRuntime(files["inputs"], threads=args.threads)}
    session = _session(fused, args.threads)
    xt = torch.from_numpy(x)

    def torch_eager() -> None:
        with torch.no_grad():
            model(xt)

    variants = {"torch_eager": torch_eager, "onnx_fused": lambda: session.run(None, {"x": x})}
    variants.update({key: (lambda rt=rt: rt.predict(x)) for key, rt in runtimes.items()})
    # each timed sample lasts ~args.sample_s, and a pause precedes it: the previous variant's
    # thread pool (ORT's and torch's threads spin-wait after a run) would otherwise steal one of
    # the 2 cores from the variant being timed — measured ~30% on edge_cnn; the order also rotates
    # every repeat so any carry-over hits every variant alike
    inner = {key: max(3, int(args.sample_s / max(_time(fn, 3), 1e-6))) for key, fn in variants.items()}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    for rep in range(args.repeats):
        for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            time.sleep(args.pause_s)
            samples[key].append(args.batch / _time(variants[key], inner[key]))
        log.info("%s speed: repeat %d/%d", name, rep + 1, args.repeats)
    for rt in runtimes.values():
        rt.close()
    return samples


# ---------------------------------------------------------------- updates

class _Predictor(threading.Thread):
    """Predicts in a loop; records (start, end, version) of every call."""

    def __init__(self, runtime: EdgeRuntime, x: np.ndarray) -> None:
        super().__init__(name="predictor", daemon=True)
        self.runtime, self.x = runtime, x
        self.records: list[tuple[float, float, int]] = []
        self.stop = threading.Event()
        self._cond = threading.Condition()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            _, version = self.runtime.predict_versioned(self.x)
            with self._cond:
                self.records.append((start, time.perf_counter(), version))
                self._cond.notify_all()

    def first_end(self, version: int, timeout: float) -> float:
        """End time of the first prediction that returned ``version`` or newer."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.records and self.records[-1][2] >= version, timeout):
                raise TimeoutError(f"no prediction with version {version} within {timeout} s")
            return next(end for _, end, v in self.records if v >= version)


class _Probe(threading.Thread):
    """A pure-Python thread sleeping 0.5 ms in a loop: a long gap between its wake-ups means another
    thread held the GIL (or the CPU was taken) that long."""

    def __init__(self) -> None:
        super().__init__(name="probe", daemon=True)
        self.gaps: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stop.is_set():
            time.sleep(0.0005)
            now = time.perf_counter()
            self.gaps.append((last, now))
            last = now


def _overlaps(start: float, end: float, windows: list[tuple[float, float]]) -> bool:
    return any(start < w_end and end > w_start for w_start, w_end in windows)


def _summary(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p95": None, "p99": None, "max": None, "n": 0}
    return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95)),
            "p99": float(np.percentile(values, 99)), "max": float(max(values)), "n": len(values)}


def _round(runtime: EdgeRuntime, x: np.ndarray, base: dict, rng: np.random.Generator, first_version: int,
           args: argparse.Namespace) -> dict:
    """``args.updates_per_round`` updates with a predicting thread and a probe running."""
    predictor, probe = _Predictor(runtime, x), _Probe()
    predictor.start()
    probe.start()
    out: dict[str, list] = {"block_ms": [], "in_force_ms": [], "first_predict_ms": [], "windows": []}
    try:
        for i in range(args.updates_per_round):
            version = first_version + i
            state = {k: (v * rng.uniform(0.9, 1.1, v.shape)).astype(np.float32) for k, v in base.items()}
            time.sleep(args.update_settle_s)
            swapped: dict[int, float] = {}
            remove = runtime.add_version_listener(lambda v: swapped.setdefault(v, time.perf_counter()))
            t0 = time.perf_counter()
            if not runtime.apply(state, version):
                raise RuntimeError(f"update {version} refused")
            t1 = time.perf_counter()
            if not runtime.wait_for_version(version, WAIT_S):
                raise TimeoutError(f"version {version} not in force within {WAIT_S} s")
            first = predictor.first_end(version, WAIT_S)
            remove()
            in_force = swapped.get(version, t1)  # inputs mode: in force when apply returns
            out["block_ms"].append(1000 * (t1 - t0))
            out["in_force_ms"].append(1000 * (in_force - t0))
            out["first_predict_ms"].append(1000 * (first - t0))
            out["windows"].append((t0, first))
        time.sleep(args.update_settle_s)
    finally:
        predictor.stop.set()
        probe.stop.set()
        predictor.join(WAIT_S)
        probe.join(WAIT_S)
    windows = out["windows"]
    during, idle = [], []
    for start, end, _ in predictor.records:
        (during if _overlaps(start, end, windows) else idle).append(1000 * (end - start))
    gaps_during, gaps_idle = [], []
    for start, end in probe.gaps:
        (gaps_during if _overlaps(start, end, windows) else gaps_idle).append(1000 * (end - start))
    out.update(predict_during=during, predict_idle=idle, gap_during=gaps_during, gap_idle=gaps_idle)
    return out


def bench_updates(base: dict, files: dict[str, Path], x: np.ndarray, args: argparse.Namespace, name: str) -> dict:
    paths = [p for p in PATHS if p.name in args.paths]
    runtimes = {p.name: EdgeRuntime(files["inputs" if p.norm_as_inputs else "initializers"], threads=args.threads,
                                    background_updates=p.background, backend=p.backend) for p in paths}
    rng = np.random.default_rng(1)
    merged: dict[str, dict[str, list]] = {p.name: {} for p in paths}
    next_version = {p.name: 1 for p in paths}
    for rep in range(args.update_repeats):
        for path in paths[rep % len(paths):] + paths[:rep % len(paths)]:
            res = _round(runtimes[path.name], x, base, rng, next_version[path.name], args)
            next_version[path.name] += args.updates_per_round
            for key, values in res.items():
                merged[path.name].setdefault(key, []).extend(values)
        log.info("%s updates: repeat %d/%d", name, rep + 1, args.update_repeats)
    out = {}
    for path in paths:
        m, rt = merged[path.name], runtimes[path.name]
        stats = rt.update_stats()
        out[path.name] = {
            "backend": rt.backend, "background_updates": rt.background_updates, "norm_mode": rt.norm_mode,
            "block_ms": _summary(m["block_ms"]), "in_force_ms": _summary(m["in_force_ms"]),
            "first_predict_ms": _summary(m["first_predict_ms"]),
            "predict_ms_idle": _summary(m["predict_idle"]), "predict_ms_during_update": _summary(m["predict_during"]),
            "probe_gap_ms_idle": _summary(m["gap_idle"]), "probe_gap_ms_during_update": _summary(m["gap_during"]),
            "max_swap_hold_ms": 1000 * stats.max_swap_hold_s,
            "mean_swap_hold_ms": 1000 * stats.total_swap_hold_s / stats.built if stats.built else None,
            "builds": stats.built, "superseded": stats.superseded,
            "block_ms_samples": m["block_ms"], "in_force_ms_samples": m["in_force_ms"],
        }
        rt.close()
    return out


# ---------------------------------------------------------------- session options

def bench_session_options(data: bytes, x: np.ndarray, args: argparse.Namespace) -> dict:
    """Build time and img/s of a plain session per graph optimization level."""
    out = {}
    for level in ("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC"):
        builds, sessions = [], []
        for _ in range(args.build_repeats):
            start = time.perf_counter()
            sessions = [_session(data, args.threads, level)]  # the previous one is freed first
            builds.append(1000 * (time.perf_counter() - start))
        session = sessions[0]

        def run() -> None:
            session.run(None, {"images": x})

        inner = max(3, int(args.sample_s / max(_time(run, 2), 1e-6)))
        time.sleep(args.pause_s)
        out[level] = {"build_ms_median": statistics.median(builds), "img_per_s": args.batch / _time(run, inner)}
    return out


# ---------------------------------------------------------------- driver

def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    torch.manual_seed(0)
    shape = (3, args.image_size, args.image_size)
    model = create_model(name, 10, image_size=args.image_size).eval()
    images = np.random.default_rng(0).integers(0, 256, (args.batch, *shape[1:], 3), dtype=np.uint8)
    files = {}
    for mode in ("initializers", "inputs"):
        files[mode] = workdir / f"{name.replace(':', '_')}-{mode}.onnx"
        export_onnx(model, files[mode], shape, model_name=name, norm_as_inputs=mode == "inputs")
    with EdgeRuntime(files["initializers"]) as probe:
        x = probe.prepare(images)
    fused = _fused_bytes(model, shape)
    samples = bench_speed(model, files, fused, x, args, name)
    throughput = {k: statistics.median(v) for k, v in samples.items()}
    base = get_norm_state(model)
    updates = bench_updates(base, files, x, args, name)
    options = bench_session_options(files["initializers"].read_bytes(), x, args) if args.build_repeats else {}
    params = sum(p.numel() for p in model.parameters())
    norm_floats = sum(v.size for v in base.values())
    fused_ips = throughput["onnx_fused"]
    return {
        "model": name,
        "image_size": args.image_size,
        "parameters": params,
        "norm_floats": norm_floats,
        "update_bytes_fp32": 4 * norm_floats,
        "model_bytes_fp32": 4 * params,
        "onnx_file_bytes": files["initializers"].stat().st_size,
        "img_per_s": throughput,
        "img_per_s_samples": samples,
        "speed_vs_fused": {k: v / fused_ips for k, v in throughput.items()},
        # the same repeat's samples are taken seconds apart: their ratio cancels the slower drifts of a shared machine
        "speed_vs_fused_paired": {k: statistics.median(a / b for a, b in zip(v, samples["onnx_fused"]))
                                  for k, v in samples.items()},
        "updates": updates,
        "session_options": options,
    }


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def tables(results: list[dict]) -> str:
    lines = ["| model | params | torch eager img/s | ONNX fused img/s | ours (init., C API) img/s "
             "| ours (init., Python binding) img/s | ours (inputs) img/s | ours/fused (init.): medians, paired "
             "| ours/fused (inputs): medians, paired |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, s, q = r["img_per_s"], r["speed_vs_fused"], r["speed_vs_fused_paired"]
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {t['torch_eager']:,.0f} | {t['onnx_fused']:,.0f} | "
            f"{t['fedshift_initializers']:,.0f} | {t['fedshift_initializers_pybind']:,.0f} | "
            f"{t['fedshift_inputs']:,.0f} | {s['fedshift_initializers']:.2f}, {q['fedshift_initializers']:.2f} | "
            f"{s['fedshift_inputs']:.2f}, {q['fedshift_inputs']:.2f} |")
    lines += ["", "| model | update path | blocking ms (median / p95) | in force ms (median) | first prediction ms "
              "(median) | prediction ms idle / during update (median) | probe gap ms p99 idle / during, max during | "
              "swap lock hold ms mean / max |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for path, u in r["updates"].items():
            lines.append(
                f"| {r['model']} | {path} | {_fmt(u['block_ms']['median'], 2)} / {_fmt(u['block_ms']['p95'], 2)} | "
                f"{_fmt(u['in_force_ms']['median'])} | {_fmt(u['first_predict_ms']['median'])} | "
                f"{_fmt(u['predict_ms_idle']['median'])} / {_fmt(u['predict_ms_during_update']['median'])} | "
                f"{_fmt(u['probe_gap_ms_idle']['p99'])} / {_fmt(u['probe_gap_ms_during_update']['p99'])}, "
                f"{_fmt(u['probe_gap_ms_during_update']['max'])} | {_fmt(u['mean_swap_hold_ms'], 3)} / "
                f"{_fmt(u['max_swap_hold_ms'], 3)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["edge_cnn", "timm:resnet18"])
    p.add_argument("--image-size", type=int, default=32, help="input H = W for every model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="speed: round-robin repeats")
    p.add_argument("--pause-s", type=float, default=0.5, help="idle time before each timed sample")
    p.add_argument("--sample-s", type=float, default=0.3, help="seconds per timed sample (batches calibrated)")
    p.add_argument("--update-repeats", type=int, default=5, help="updates: round-robin repeats over the paths")
    p.add_argument("--updates-per-round", type=int, default=3)
    p.add_argument("--update-settle-s", type=float, default=0.3, help="predicting without updates before each one")
    p.add_argument("--paths", nargs="+", default=[q.name for q in PATHS], choices=[q.name for q in PATHS])
    p.add_argument("--build-repeats", type=int, default=3, help="session options: builds per level (0: skip)")
    p.add_argument("--note", default="", help="free text recorded with the settings (e.g. what else loads the machine)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/edge_runtime.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(name, args, Path(tmp)) for name in args.models]
    report = {
        "benchmark": "edge_runtime",
        "command": shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "definitions": {
            "block_ms": "how long EdgeRuntime.apply blocked its caller",
            "in_force_ms": "apply called -> the swap (every prediction from then on uses the new version)",
            "first_predict_ms": "apply called -> end of the first prediction that returned the new version",
            "predict_ms_during_update": "predictions overlapping [apply called, first prediction with it]",
            "probe_gap_ms": "gaps between wake-ups of a Python thread sleeping 0.5 ms: GIL or CPU taken from it",
            "max_swap_hold_ms": "longest the runtime's lock was held by a swap (the most a swap delays a prediction)",
            "mean_swap_hold_ms": "the same, averaged over the swaps",
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "onnxruntime": ort.__version__, "load_average_1m_start": load_start[0],
                    "load_average_1m_end": os.getloadavg()[0]},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(tables(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
