"""``fedshift adapt``: a cloud process and N forward-only edge processes on loopback, one method.

The launcher prepares everything the processes need (the edge model exported to ONNX, one
corrupted stream per edge as .npz, the teacher weights), starts ``fedshift cloud`` on a free port
and ``fedshift edge`` once per edge, waits for the edges, stops the cloud, and aggregates the
edges' summaries into ``results.json`` plus TensorBoard events (one run per edge). Every process it
starts is stopped on the way out, also on errors and Ctrl-C.

Streams: the pooled digits-shift test splits, corrupted at one severity; the corruptions are dealt
round-robin to the edges (edge i gets corruptions i, i+N, …), so every corruption is streamed once
whatever N is. The no-adaptation accuracy of the same streams is measured in-process with the
running-statistics export (``no_adapt_accuracy``), and, for methods whose edges normalize with
batch statistics, the accuracy of that alone without any cloud (``bn_stats_accuracy``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from core.corruptions import CORRUPTIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    """How a method maps onto the edge selection and the cloud step."""

    edge: str  # edge selection method
    cloud: str | None  # cloud learner method; None: no cloud (forward-only baselines)
    batch_stats: bool = True  # edge BN normalizes with each batch's statistics
    edge_args: tuple[str, ...] = ()
    cloud_args: tuple[str, ...] = ()
    about: str = ""


# EATA's d = 0.05 for 1000 classes sits ~1.6x above cos(onehot, uniform) = 1/sqrt(C) ≈ 0.032;
# the same ratio for C = 10 (1/sqrt(10) ≈ 0.32) gives 0.5. A scaling argument, not tuned.
EATA_REDUNDANCY = 0.5

METHODS: dict[str, MethodSpec] = {
    "no_adapt": MethodSpec("none", None, batch_stats=False, about="the exported model as is"),
    "bn_stats": MethodSpec("none", None, about="edge BN statistics only, no cloud"),
    "tent": MethodSpec("all", "tent", cloud_args=("--no-replay",), about="cloud-Tent: upload all, entropy on the student"),
    "distill_all": MethodSpec("all", "distill", about="CEMA's cloud step on every sample"),
    "eata": MethodSpec("eata", "cema", about="EATA selection (H < E0 + redundancy) + CEMA's cloud step"),
    "cema": MethodSpec("cema", "cema", about="CEMA: dynamic E_max, E_min, CEMA's cloud step"),
    "random": MethodSpec("random", "cema", about="random uploads at a given rate + CEMA's cloud step"),
    "cema_no_replay": MethodSpec("cema", "cema", cloud_args=("--no-replay",), about="ablation: no replay"),
    "cema_static": MethodSpec("cema", "cema", edge_args=("--static-threshold",), about="ablation: E_max = E0"),
    "cema_no_emin": MethodSpec("cema", "cema", edge_args=("--no-emin",), about="ablation: no E_min"),
}


@dataclass(frozen=True)
class AdaptConfig:
    """One adaptation run (parsed once from the command line or a scenario)."""

    method: str = "cema"
    edges: int = 1
    corruptions: tuple[str, ...] = CORRUPTIONS
    severity: int = 5
    protocol: str = "reset"
    passes: int = 1
    limit: int | None = None  # samples per edge
    batch_size: int = 64
    seed: int = 0
    data_seed: int = 0  # digits-shift split: the streams are its test images (never trained on)
    image_size: int = 32
    sync_s: float = 2.0  # lockstep bound: an edge waits this long for the cloud's next version
    random_rate: float | None = None  # method "random"
    redundancy: float | None = None  # edge redundancy threshold d (None: off; "eata": EATA_REDUNDANCY)
    edge_model: str = "edge_cnn"
    edge_weights: str | None = None  # None: the built-in edge model (trained once, cached)
    teacher: str = "teacher_resnet"
    teacher_weights: str | None = None  # None: the built-in robust teacher (trained once, cached)
    teacher_epochs: int = 30  # the built-in teacher's training epochs (each setting cached apart)
    device: str = "cpu"  # the cloud learners' torch device ("cuda" on a GPU machine)
    cloud_address: str = ""  # HOST:PORT of a running cloud: no local cloud process is started
    cache: str | None = None
    threads: int = 1
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.edges < 1:
            raise ValueError(f"edges must be >= 1, got {self.edges}")
        if self.edges > len(self.corruptions):
            raise ValueError(f"{self.edges} edges for {len(self.corruptions)} corruptions: each edge needs one")
        if unknown := [c for c in self.corruptions if c not in CORRUPTIONS]:
            raise ValueError(f"unknown corruptions {unknown}; valid: {', '.join(CORRUPTIONS)}")
        if self.method == "random" and not (self.random_rate and 0 < self.random_rate <= 1):
            raise ValueError("method 'random' needs random_rate in (0, 1]")
        if self.protocol not in ("reset", "continual"):
            raise ValueError(f"protocol must be 'reset' or 'continual', got {self.protocol!r}")


@dataclass
class Prepared:
    """Files the processes read."""

    edge_onnx: Path
    plain_onnx: Path  # running-statistics export, for no_adapt_accuracy
    bn_onnx: Path | None  # batch-statistics export, for bn_stats_accuracy (None: method uses none)
    edge_weights: Path
    teacher_weights: Path | None
    streams: list[Path] = field(default_factory=list)


def prepare(cfg: AdaptConfig, out: Path) -> Prepared:
    """Resolve models (training the built-ins once if not cached), export, write the streams."""
    from core.data import make_digits_shift
    from core.export import export_onnx
    from core.streams import build_stream
    from core.teacher import DEFAULT_EDGE, DEFAULT_TEACHER, eval_split, model_or_builtin
    from edge.sources import save_stream_npz

    spec = METHODS[cfg.method]
    builtin = {"data_seed": cfg.data_seed, "image_size": cfg.image_size}
    model, edge_weights = model_or_builtin(cfg.edge_model, cfg.edge_weights, replace(DEFAULT_EDGE, **builtin),
                                           cfg.cache, image_size=cfg.image_size)
    teacher_weights = None
    if spec.cloud is not None and spec.cloud != "tent" and not cfg.cloud_address:
        teacher_builtin = replace(DEFAULT_TEACHER, epochs=cfg.teacher_epochs, **builtin)
        _, teacher_weights = model_or_builtin(cfg.teacher, cfg.teacher_weights, teacher_builtin, cfg.cache,
                                              image_size=cfg.image_size)
    models_dir = out / "models"
    edge_onnx = models_dir / "edge.onnx"
    plain_onnx = models_dir / "edge_running_stats.onnx"
    shape = (3, cfg.image_size, cfg.image_size)
    export_onnx(model, plain_onnx, shape, model_name=cfg.edge_model)
    if spec.batch_stats:
        export_onnx(model, edge_onnx, shape, model_name=cfg.edge_model, batch_stats=True)
    else:
        edge_onnx = plain_onnx
    test = eval_split(make_digits_shift(seed=cfg.data_seed, image_size=cfg.image_size))
    prepared = Prepared(edge_onnx, plain_onnx, edge_onnx if spec.batch_stats else None, edge_weights,
                        teacher_weights)
    for i in range(cfg.edges):
        mine = cfg.corruptions[i::cfg.edges]
        stream = build_stream(test.images, test.labels, corruptions=mine, severities=(cfg.severity,),
                              protocol=cfg.protocol, passes=cfg.passes, seed=cfg.seed * 1000 + i)
        path = out / "streams" / f"edge{i}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_stream_npz(path, stream)
        prepared.streams.append(path)
        log.info("edge%d stream: %s (%d samples)", i, ", ".join(mine), len(stream))
    return prepared


def _edge_argv(cfg: AdaptConfig, i: int, prep: Prepared, server: str, out: Path) -> list[str]:
    from simulations.processes import fedshift_argv

    spec = METHODS[cfg.method]
    argv = fedshift_argv("edge", "--server", server, "--model", str(prep.edge_onnx),
                         "--source", f"npz:{prep.streams[i]}", "--edge-id", f"edge{i}",
                         "--method", spec.edge, "--batch-size", str(cfg.batch_size),
                         "--threads", str(cfg.threads), "--seed", str(cfg.seed * 1000 + i),
                         "--out", str(out / "edges" / f"edge{i}.json"), *spec.edge_args)
    redundancy = cfg.redundancy if cfg.redundancy is not None else (EATA_REDUNDANCY if cfg.method == "eata" else None)
    if redundancy is not None:
        argv += ["--redundancy", str(redundancy)]
    if cfg.method == "random":
        argv += ["--random-rate", str(cfg.random_rate)]
    if cfg.limit:
        argv += ["--limit", str(cfg.limit)]
    if spec.cloud is not None and cfg.sync_s > 0:
        argv += ["--sync", str(cfg.sync_s)]
    return argv


def _cloud_argv(cfg: AdaptConfig, prep: Prepared, out: Path, port_file: Path) -> list[str]:
    from simulations.processes import fedshift_argv

    spec = METHODS[cfg.method]
    argv = fedshift_argv("cloud", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
                         "--student", cfg.edge_model, "--student-weights", str(prep.edge_weights),
                         "--method", str(spec.cloud), "--seed", str(cfg.seed), "--threads", str(cfg.threads),
                         "--image-size", str(cfg.image_size), "--device", cfg.device,
                         "--max-workers", str(2 * cfg.edges + 4), "--out", str(out), *spec.cloud_args)
    if cfg.sync_s > 0:
        argv.append("--lockstep")
    if prep.teacher_weights is not None:
        argv += ["--teacher", cfg.teacher, "--teacher-weights", str(prep.teacher_weights)]
    if cfg.cache:
        argv += ["--cache", cfg.cache]
    return argv


def run_adapt(cfg: AdaptConfig, out: str | os.PathLike) -> dict:
    """Run one method end to end; returns (and writes) ``results.json``."""
    from simulations.processes import ProcessGroup, wait_for_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.monotonic()
    prep = prepare(cfg, out)
    t_prepared = time.monotonic()
    spec = METHODS[cfg.method]
    edge_names = [f"edge{i}" for i in range(cfg.edges)]
    with ProcessGroup(out / "logs") as group:
        server = "none"
        if spec.cloud is not None and cfg.cloud_address:
            server = cfg.cloud_address
            log.info("using the running cloud at %s", server)
        elif spec.cloud is not None:
            port_file = out / "cloud.port"
            port_file.unlink(missing_ok=True)
            cloud = group.start("cloud", _cloud_argv(cfg, prep, out, port_file))
            port = wait_for_file(port_file, cloud, timeout=300, what="fedshift cloud")
            server = f"127.0.0.1:{port}"
            log.info("cloud up on %s (pid %d)", server, cloud.pid)
        for i, name in enumerate(edge_names):
            group.start(name, _edge_argv(cfg, i, prep, server, out))
        log.info("%d edge process(es) running: %s", cfg.edges, group.pids())
        codes = _wait_with_progress(group, edge_names, out, cfg.timeout_s)
        failed = {n: c for n, c in codes.items() if c != 0}
        if failed:
            tails = "\n".join(f"--- {n} ---\n{group.tail(n)}" for n in failed)
            raise RuntimeError(f"edge process(es) failed: {failed}\n{tails}")
        if spec.cloud is not None and not cfg.cloud_address:
            group.stop("cloud", grace=30)
    summaries = [json.loads((out / "edges" / f"{n}.json").read_text()) for n in edge_names]
    no_adapt = forward_only_accuracy(prep.plain_onnx, prep.streams, cfg.batch_size, cfg.limit)
    results = aggregate(cfg, summaries, no_adapt)
    if prep.bn_onnx is not None:
        results["bn_stats_accuracy"] = forward_only_accuracy(prep.bn_onnx, prep.streams, cfg.batch_size, cfg.limit)
    results["timing_s"] = {"prepare": t_prepared - t0, "adapt": time.monotonic() - t_prepared}
    write_edge_tensorboard(summaries, out / "edges")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log.info("%s: online accuracy %.2f%% (no adaptation %.2f%%), uploaded %.1f%%", cfg.method,
             100 * results["accuracy"]["overall"], 100 * results["no_adapt_accuracy"]["overall"],
             100 * results["upload_rate"])
    return results


def _wait_with_progress(group, names: Sequence[str], out: Path, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return group.wait(names, timeout=min(15.0, max(0.1, deadline - time.monotonic())))
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise
            for name in names:
                line = group.tail(name, 1)
                if line:
                    log.info("%s: %s", name, line[-160:])


def forward_only_accuracy(model: Path, streams: Sequence[Path], batch_size: int, limit: int | None = None) -> dict:
    """Accuracy of an exported model on the streams, in-process, without any cloud: the running-
    statistics export gives ``no_adapt_accuracy``, the batch-statistics one ``bn_stats_accuracy``
    (batches as the edges form them: ``batch_size`` samples, never across segments; ``limit``
    samples per stream, like ``fedshift edge --limit``)."""
    from edge.runtime import EdgeRuntime
    from edge.sources import load_stream_npz

    runtime = EdgeRuntime(model)
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for path in streams:
        left = limit if limit else None
        for seg in load_stream_npz(path).segments:
            n = len(seg.images) if left is None else min(left, len(seg.images))
            if n == 0:
                break
            pred = np.concatenate([runtime.predict(seg.images[i:min(i + batch_size, n)]).argmax(1)
                                   for i in range(0, n, batch_size)])
            correct[seg.corruption] = correct.get(seg.corruption, 0) + int((pred == seg.labels[:n]).sum())
            total[seg.corruption] = total.get(seg.corruption, 0) + n
            left = None if left is None else left - n
    return {"overall": sum(correct.values()) / max(1, sum(total.values())),
            "per_corruption": {c: correct[c] / total[c] for c in total}}


def aggregate(cfg: AdaptConfig, summaries: Sequence[dict], no_adapt: dict) -> dict:
    """Sum the edges' counters; accuracy per corruption over all edges that streamed it."""
    def total(key: str) -> int:
        return int(sum(s.get(key) or 0 for s in summaries))

    per: dict[str, dict[str, int]] = {}
    for s in summaries:
        for name, c in s["per_corruption"].items():
            acc = per.setdefault(name, {"correct": 0, "labelled": 0, "seen": 0, "uploaded": 0})
            for k in acc:
                acc[k] += int(c.get(k) or 0)
    seen = total("seen")
    for s in summaries:
        if s.get("uploaded", 0) + s.get("upload_failed", 0) != s.get("kept", 0) and s.get("server"):
            raise RuntimeError(f"{s['edge_id']}: uploaded + failed != kept")
    return {
        "method": cfg.method,
        "about": METHODS[cfg.method].about,
        "config": asdict(cfg),
        "edges": len(summaries),
        "accuracy": {
            "overall": total("correct") / max(1, total("labelled")),
            "per_corruption": {n: v["correct"] / max(1, v["labelled"]) for n, v in per.items()},
        },
        "no_adapt_accuracy": no_adapt,
        "seen": seen,
        "kept": total("kept"),
        "uploaded": total("uploaded"),
        "upload_failed": total("upload_failed"),
        "upload_rate": total("uploaded") / max(1, seen),
        "uploaded_per_corruption": {n: v["uploaded"] for n, v in per.items()},
        "bytes_up": total("bytes_up"),
        "bytes_down": total("bytes_down"),
        "versions_applied": total("versions_applied"),
        "update_latency_s_mean": _mean_latency(summaries),
        "per_edge": [{k: s.get(k) for k in ("edge_id", "seen", "kept", "uploaded", "accuracy", "bytes_up",
                                            "bytes_down", "versions_applied", "wall_s", "sync_timeouts")}
                     for s in summaries],
    }


def _mean_latency(summaries: Sequence[dict]) -> float | None:
    lat = [(s["update_latency_s"]["count"], s["update_latency_s"]["mean"]) for s in summaries
           if s.get("update_latency_s") and s["update_latency_s"].get("count")]
    n = sum(c for c, _ in lat)
    return sum(c * m for c, m in lat) / n if n else None


def write_edge_tensorboard(summaries: Sequence[dict], log_dir: Path) -> None:
    """Edge curves from the summaries' timelines (edges are torch-free; the launcher writes them)."""
    from torch.utils.tensorboard import SummaryWriter

    for s in summaries:
        t = s.get("timeline") or {}
        if not t.get("seen"):
            continue
        with SummaryWriter(str(log_dir / str(s["edge_id"]))) as w:
            correct = labelled = uploaded = 0
            for j, seen in enumerate(t["seen"]):
                n = t["n"][j]
                uploaded += t["uploaded"][j]
                if t["correct"][j] is not None:
                    correct += t["correct"][j]
                    labelled += n
                    w.add_scalar("edge/batch_accuracy", t["correct"][j] / max(1, n), seen)
                    w.add_scalar("edge/online_accuracy", correct / max(1, labelled), seen)
                w.add_scalar("edge/upload_rate", uploaded / max(1, seen), seen)
                w.add_scalar("edge/kept_in_batch", t["kept"][j] / max(1, n), seen)
                w.add_scalar("edge/mean_entropy", t["mean_entropy"][j], seen)
                w.add_scalar("edge/version", t["version"][j], seen)
                if t["e_max"][j] is not None:
                    w.add_scalar("edge/e_max", t["e_max"][j], seen)
            w.add_scalar("edge/bytes_up", s.get("bytes_up", 0), t["seen"][-1])
            w.add_scalar("edge/bytes_down", s.get("bytes_down", 0), t["seen"][-1])

