"""What the edge ⇄ cloud protocol costs on loopback, measured with the project's real components.

Four measurements, one run (issue 4, item 6):

- **upload latency**: round trip of one ``Upload`` RPC made with :class:`edge.client.CloudClient`
  (client-side encode included) for batches of 1, 16 and 64 uint8 32×32×3 images;
- **sustained uploads/s** with 1, 4 and 8 concurrent edges, each a separate process uploading in
  a closed loop (the next upload leaves when the previous one is acknowledged, as
  ``edge.node`` does); requests/s and samples/s over a common time window;
- **update latency**: cloud step done (``ParameterUpdate.created_unix``, stamped when the learner
  published) → in force at the edge (the new session swapped in after its background build, as
  :class:`edge.client.Subscriber` times it), one version per 16-sample upload;
- **bytes**: serialized ``UploadRequest`` size per sample as uint8 vs the same request carrying
  float32 images, and the serialized ``ParameterUpdate`` vs the whole model's fp32 parameter bytes
  (edge_cnn, and teacher_resnet as a larger student).

Why two servers: the real :class:`server.cloud.CloudServer` runs its CEMA learner (teacher +
student steps, one torch thread as the CLI's default) in the same process as its RPC threads, so
its RPC figures include that competition for the CPU and the GIL, and its handler converts the
images to float tensors. A minimal in-benchmark servicer that only decodes and acknowledges
(``ack``) gives the pure gRPC + codec cost beside it. Servers run in this process, a fresh one per
trial (so no learner backlog carries over); edges are worker processes spawned once (torch-free,
like real edges; processes rather than threads so that the edges do not share the GIL with each
other or with the server). Trials of the variants alternate within each repeat so a noisy,
shared machine hits them alike; reported figures are medians over repeats.

    python benchmarks/cloud_edge.py --out runs/bench/cloud_edge.json
    python benchmarks/cloud_edge.py --quick --out /tmp/cloud_edge.json   # smoke settings
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from concurrent import futures
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Mapping, Sequence

# Keep the module top torch-free: spawned edge workers re-import it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from protos.codec import GRPC_OPTIONS, MAX_MESSAGE_BYTES, decode_images, encode_array, encode_state  # noqa: E402
from protos.fedshift.v1 import edge_pb2 as pb  # noqa: E402
from protos.fedshift.v1 import edge_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("bench.cloud_edge")

IMAGE_SHAPE = (32, 32, 3)  # (H, W, C) of every upload
KINDS = ("ack", "cloud")  # the minimal servicer, the real CEMA CloudServer
KIND_LABEL = {"ack": "ack-only servicer", "cloud": "CloudServer (CEMA)"}


# ------------------------------------------------------------------------------ helpers
def _stats_ms(values_s: Sequence[float]) -> dict[str, float]:
    """Median / p90 / mean / max of durations in seconds, as milliseconds."""
    a = 1000.0 * np.asarray(values_s, dtype=np.float64)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "mean_ms": float(a.mean()), "max_ms": float(a.max()), "count": int(a.size)}


def _images(n: int, seed: int) -> np.ndarray:
    """Random uint8 images: incompressible, like camera frames (gRPC does not compress anyway)."""
    return np.random.default_rng(seed).integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)


def _entropies(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 2.0, n).astype(np.float32)


def upload_request(images: np.ndarray, entropies: np.ndarray, sequence: int, edge_id: str) -> pb.UploadRequest:
    """The request ``CloudClient.upload`` builds (same fields), for any image dtype: the float32
    variant is what an edge uploading preprocessed tensors would send."""
    return pb.UploadRequest(edge_id=edge_id, sequence=int(sequence), images=encode_array(images, "images"),
                            entropies=np.asarray(entropies, np.float32).tolist(), labels=[], edge_version=0,
                            auth_token="", seen=int(sequence + 1) * len(images), episode=0)


# ------------------------------------------------------------------------------ ack-only server
class AckServicer(pb_grpc.EdgeServiceServicer):
    """Decodes and validates an upload like the cloud does, then acknowledges: the floor of what
    one ``Upload`` can cost through gRPC and the codec, with no learner and no tensor conversion."""

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:  # noqa: N802
        return pb.RegisterReply(version=0, next_sequence=0, max_message_bytes=MAX_MESSAGE_BYTES)

    def Upload(self, request: pb.UploadRequest, context: grpc.ServicerContext) -> pb.UploadReply:  # noqa: N802
        try:
            images = decode_images(request.images)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if len(request.entropies) != len(images):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "entropies do not match the images")
        return pb.UploadReply(sequence=request.sequence, accepted=len(images))


class AckServer:
    """A started gRPC server hosting :class:`AckServicer` on a free loopback port."""

    def __init__(self, max_workers: int = 32) -> None:
        self._executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ack-rpc")
        self._server = grpc.server(self._executor, options=list(GRPC_OPTIONS))
        pb_grpc.add_EdgeServiceServicer_to_server(AckServicer(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        if self.port == 0:
            self._executor.shutdown(wait=False)
            raise OSError("cannot bind a loopback port")
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=0.5).wait(10)
        self._executor.shutdown(wait=True)


# ------------------------------------------------------------------------------ edge workers
def _edge_register(address: str, edge_id: str, runtime: Any = None) -> Any:
    """A CloudClient registered at ``address`` (with the model's identity when a runtime is given)."""
    from edge.client import CloudClient

    client = CloudClient(address, edge_id, timeout=60.0, connect_timeout=30.0, seed=0)
    if runtime is not None:
        client.register(runtime)
    else:  # no model file: register by id only, as the cloud allows
        client.call("register", client.stub.Register, pb.RegisterRequest(edge_id=edge_id),
                    timeout=30.0, wait_for_ready=True)
    return client


def _task_latency(task: dict[str, Any]) -> dict[str, Any]:
    """Sequential uploads of one batch size; per-upload round trips (after ``warmup`` untimed ones)."""
    n, count, warmup = task["batch"], task["uploads"], task["warmup"]
    images, ent = _images(n, seed=n), _entropies(n, seed=n)
    client = _edge_register(task["address"], task["edge_id"])
    try:
        times, sizes = [], {}
        for seq in range(warmup + count):
            start = time.perf_counter()
            result = client.upload(images, ent, seq, seen=(seq + 1) * n)
            elapsed = time.perf_counter() - start
            if result.reply.accepted != n:
                raise RuntimeError(f"upload {seq}: {result.reply.accepted} of {n} samples accepted")
            sizes[seq] = result.request_bytes
            if seq >= warmup:
                times.append(elapsed)
        return {"latencies_s": times, "request_bytes": sizes}
    finally:
        client.close()


class _Stop(Exception):
    """The coordinator sent ``None`` (stop) where a task expected more input."""


def _task_sustain(task: dict[str, Any], conn: Connection) -> dict[str, Any]:
    """Closed-loop uploads from one edge; counts the uploads completed inside the common window.

    Two phases: register, say ready, wait for the coordinator's start time (so all edges start
    together), then upload until the window ends. ``time.monotonic`` is CLOCK_MONOTONIC,
    system-wide on Linux, so the coordinator's window means the same instant here."""
    n = task["batch"]
    images, ent = _images(n, seed=100 + task["index"]), _entropies(n, seed=100 + task["index"])
    client = _edge_register(task["address"], task["edge_id"])
    try:
        client.upload(images, ent, 0)  # connection warm
        conn.send({"ready": True})
        go = conn.recv()
        if go is None:  # the coordinator gave up on this trial and is closing the pool
            raise _Stop
        t_begin, t_end = go["begin"], go["end"]
        requests = samples = 0
        latencies: list[float] = []
        seq = 1
        while True:
            start = time.monotonic()
            if start >= t_end:
                break
            result = client.upload(images, ent, seq, seen=(seq + 1) * n)
            done = time.monotonic()
            seq += 1
            if t_begin <= done <= t_end:
                requests += 1
                samples += int(result.reply.accepted)
                latencies.append(done - start)
        return {"requests": requests, "samples": samples, "latencies_s": latencies, "total_uploads": seq}
    finally:
        client.close()


def _task_updates(task: dict[str, Any]) -> dict[str, Any]:
    """One real edge (EdgeRuntime + Subscriber): upload one cloud batch, wait until the version it
    produced is in force, repeat. The latency is the Subscriber's own (publish stamp → in force)."""
    from edge.runtime import EdgeRuntime

    apply_s: list[float] = []

    class TimedRuntime(EdgeRuntime):
        """Records how long each apply blocks the subscriber (validation and hand-over; the session
        is rebuilt after it returns), to split the update latency."""

        def apply(self, state: Mapping[str, np.ndarray], version: int) -> bool:
            start = time.perf_counter()
            applied = super().apply(state, version)
            if applied:
                apply_s.append(time.perf_counter() - start)
            return applied

    runtime = TimedRuntime(task["model"], threads=1)
    client = _edge_register(task["address"], task["edge_id"], runtime)
    sub = None
    try:
        sub = client.subscribe(runtime)
        n = task["batch"]
        round_trip: list[float] = []
        for i in range(task["updates"]):
            start = time.perf_counter()
            client.upload(_images(n, seed=1000 + i), _entropies(n, seed=1000 + i), i, seen=(i + 1) * n)
            if not sub.wait_for_version(i + 1, timeout=task["timeout_s"]):
                raise TimeoutError(f"version {i + 1} not applied within {task['timeout_s']} s "
                                   f"(in force: {runtime.version}, subscriber: {sub.stats()})")
            round_trip.append(time.perf_counter() - start)
        from protos.config import to_mapping

        stats = to_mapping(sub.stats())
        # stats() summarises the latencies as mean/max; the median needs the samples
        latencies = sub.latencies()
        return {"latencies_s": latencies, "apply_s": apply_s, "upload_to_applied_s": round_trip,
                "subscriber": stats, "final_version": runtime.version}
    finally:
        if sub is not None:
            sub.close()
        client.close()


def _edge_worker(index: int, conn: Connection) -> None:
    """A long-lived edge process: runs the tasks it receives until it gets ``None`` or the pipe closes."""
    logging.basicConfig(level=logging.WARNING)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            kind = task["kind"]
            if kind == "latency":
                result = _task_latency(task)
            elif kind == "sustain":
                result = _task_sustain(task, conn)
            elif kind == "updates":
                result = _task_updates(task)
            else:
                raise ValueError(f"unknown task {kind!r}")
            conn.send({"ok": result})
        except _Stop:
            return
        except BaseException:  # noqa: BLE001 - reported to the coordinator, which raises
            conn.send({"error": f"edge worker {index}: {traceback.format_exc()}"})


class EdgePool:
    """``size`` edge processes (spawned: no gRPC state is forked), stopped by :meth:`close`."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.workers: list[tuple[mp.process.BaseProcess, Connection]] = []
        try:
            for i in range(size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_edge_worker, args=(i, child), name=f"bench-edge-{i}", daemon=True)
                proc.start()
                child.close()
                self.workers.append((proc, parent))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _reply(conn: Connection, timeout: float) -> dict[str, Any]:
        if not conn.poll(timeout):
            raise TimeoutError(f"an edge worker did not answer within {timeout} s")
        msg = conn.recv()
        if "error" in msg:
            raise RuntimeError(msg["error"])
        return msg

    def run(self, index: int, task: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """Run one task on worker ``index`` and return its result."""
        conn = self.workers[index][1]
        conn.send(task)
        return self._reply(conn, timeout)["ok"]

    def sustain(self, tasks: list[dict[str, Any]], warmup_s: float, duration_s: float) -> tuple[list[dict], float]:
        """Run closed-loop uploads on the first ``len(tasks)`` workers over one common window."""
        conns = [self.workers[i][1] for i in range(len(tasks))]
        for conn, task in zip(conns, tasks):
            conn.send(task)
        for conn in conns:  # all registered and warm
            self._reply(conn, 120.0)
        begin = time.monotonic() + 0.05 + warmup_s
        go = {"begin": begin, "end": begin + duration_s}
        for conn in conns:
            conn.send(go)
        results = [self._reply(conn, duration_s + warmup_s + 120.0)["ok"] for conn in conns]
        return results, duration_s

    def close(self) -> None:
        """Ask every worker to stop, then terminate / kill the ones that do not."""
        for proc, conn in self.workers:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc, conn in self.workers:
            proc.join(5)
            if proc.is_alive():
                log.warning("edge worker %s did not stop: terminating", proc.name)
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()
        self.workers = []


# ------------------------------------------------------------------------------ servers per trial
class Models:
    """Untrained student / teacher templates (no training, no cache: RPC cost does not depend on
    the weights) and the student's ONNX export for the update-latency edge."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        import torch

        from core.export import export_onnx
        from core.models import create_model

        torch.manual_seed(0)
        self.student = create_model("edge_cnn", 10, image_size=IMAGE_SHAPE[0]).eval()
        self.teacher = create_model("teacher_resnet", 10, image_size=IMAGE_SHAPE[0], width=args.teacher_width,
                                    blocks=args.teacher_blocks).eval()
        self.onnx = workdir / "edge_cnn.onnx"
        export_onnx(self.student, self.onnx, (IMAGE_SHAPE[2], IMAGE_SHAPE[0], IMAGE_SHAPE[1]), model_name="edge_cnn")


class _Server:
    """One started server of ``kind`` for one trial; always stopped on exit."""

    def __init__(self, kind: str, models: Models, args: argparse.Namespace, **cema: Any) -> None:
        self.kind, self._models, self._args, self._cema = kind, models, args, cema

    def __enter__(self) -> "_Server":
        self.cloud: Any = None  # the CloudServer of a "cloud" trial
        if self.kind == "ack":
            self._server: Any = AckServer()
            self.address = self._server.address
        else:
            from core.cema import CemaConfig
            from server.cloud import CloudConfig, CloudServer

            config = CloudConfig(image_size=IMAGE_SHAPE[0], in_chans=IMAGE_SHAPE[2], insecure=True,
                                 cema=CemaConfig(batch_size=self._args.cloud_batch, **self._cema),
                                 shared=False, max_workers=32)
            from server.cloud_cli import read_edge_model

            self._server = self.cloud = CloudServer(self._models.student, self._models.teacher, config,
                                                    preprocess=read_edge_model(self._models.onnx).preprocess)
            try:
                self._server.start()
            except BaseException:
                self._server.stop(grace=0)
                raise
            self.address = f"127.0.0.1:{self._server.port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "ack":
            self._server.stop()
        else:
            self._server.stop(grace=0.5)


def _rotated(kinds: Sequence[str], rep: int) -> list[str]:
    """Alternate which variant goes first in each repeat (no fixed order bias)."""
    k = rep % len(kinds)
    return list(kinds[k:]) + list(kinds[:k])


# ------------------------------------------------------------------------------ measurements
def bench_upload_latency(pool: EdgePool, models: Models, args: argparse.Namespace) -> tuple[dict, dict]:
    """Upload round trips per server and batch size; also the sizes CloudClient reported."""
    per: dict[str, dict[int, list[list[float]]]] = {k: {n: [] for n in args.latency_batches} for k in args.kinds}
    sizes: dict[int, dict[int, int]] = {}
    for rep in range(args.repeats):
        for n in args.latency_batches:
            for kind in _rotated(args.kinds, rep):
                with _Server(kind, models, args) as server:
                    res = pool.run(0, {"kind": "latency", "address": server.address, "edge_id": "edge-lat",
                                       "batch": n, "uploads": args.latency_uploads, "warmup": 2})
                per[kind][n].append(res["latencies_s"])
                sizes.setdefault(n, {int(k): int(v) for k, v in res["request_bytes"].items()})
        log.info("upload latency: repeat %d/%d done", rep + 1, args.repeats)
    out: dict[str, dict[str, Any]] = {}
    for kind, by_n in per.items():
        out[kind] = {}
        for n, reps in by_n.items():
            rep_stats = [_stats_ms(r) for r in reps]
            out[kind][str(n)] = {
                "batch": n,
                "median_ms": statistics.median(s["median_ms"] for s in rep_stats),
                "p90_ms": statistics.median(s["p90_ms"] for s in rep_stats),
                "repeat_median_ms": [s["median_ms"] for s in rep_stats],
                "repeat_p90_ms": [s["p90_ms"] for s in rep_stats],
                "uploads_per_repeat": len(reps[0]),
            }
    return out, sizes


def bench_throughput(pool: EdgePool, models: Models, args: argparse.Namespace) -> dict:
    """Sustained closed-loop uploads with 1..N edge processes, per server."""
    per: dict[str, dict[int, list[dict[str, Any]]]] = {k: {e: [] for e in args.edges} for k in args.kinds}
    n = args.sustain_batch
    for rep in range(args.repeats):
        for edges in args.edges:
            for kind in _rotated(args.kinds, rep):
                with _Server(kind, models, args) as server:
                    tasks = [{"kind": "sustain", "address": server.address, "edge_id": f"edge-{i}", "index": i,
                              "batch": n} for i in range(edges)]
                    results, window = pool.sustain(tasks, args.warmup_s, args.duration_s)
                requests = sum(r["requests"] for r in results)
                samples = sum(r["samples"] for r in results)
                lat = [x for r in results for x in r["latencies_s"]]
                per[kind][edges].append({
                    "requests_per_s": requests / window, "samples_per_s": samples / window,
                    "requests": requests, "samples": samples, "window_s": window,
                    "latency_median_ms": 1000 * float(np.median(lat)) if lat else None,
                    "per_edge_requests": [r["requests"] for r in results],
                })
                log.info("sustained: repeat %d, %d edge(s), %s: %.0f req/s, %.0f samples/s", rep + 1, edges, kind,
                         requests / window, samples / window)
    out: dict[str, dict[str, Any]] = {}
    for kind, by_e in per.items():
        out[kind] = {}
        for edges, reps in by_e.items():
            lat = [r["latency_median_ms"] for r in reps if r["latency_median_ms"] is not None]
            out[kind][str(edges)] = {
                "edges": edges, "batch": n,
                "requests_per_s": statistics.median(r["requests_per_s"] for r in reps),
                "samples_per_s": statistics.median(r["samples_per_s"] for r in reps),
                "latency_median_ms": statistics.median(lat) if lat else None,
                "repeats": reps,
            }
    return out


LEARN_VARIANTS = ("before", "channels_last", "after")  # threads 1 / contiguous; threads 1 / channels-last; both


def _learn_variant(name: str, args: argparse.Namespace) -> tuple[int, bool]:
    """(torch threads, channels_last) of a learning variant: ``before`` is the cloud as issue 10
    found it (one thread, contiguous tensors); ``after`` adds ``--learn-threads`` (the cores the
    edges leave idle while they wait in lockstep) to the channels-last format."""
    return {"before": (1, False), "channels_last": (1, True), "after": (args.learn_threads, True)}[name]


def bench_learning(models: Models, args: argparse.Namespace) -> dict:
    """Cloud steps/s and uploads learnt/s of the real CloudServer (per-edge students): ``edges``
    clients each upload ``--learn-samples`` images in 16-image requests as fast as acknowledged,
    timed from the first upload until every learner is idle (all uploads learnt)."""
    import torch

    from edge.client import CloudClient

    per: dict[str, dict[int, list[dict[str, float]]]] = {v: {e: [] for e in args.learn_edges} for v in LEARN_VARIANTS}
    n, count = 16, max(1, args.learn_samples // 16)
    images, ent = _images(n, seed=1), _entropies(n, seed=1)
    threads_before = torch.get_num_threads()
    try:
        for rep in range(args.repeats):
            for edges in args.learn_edges:
                for variant in _rotated(LEARN_VARIANTS, rep):
                    threads, channels_last = _learn_variant(variant, args)
                    torch.set_num_threads(threads)
                    with _Server("cloud", models, args, channels_last=channels_last) as server:
                        clients = [CloudClient(server.address, f"edge-{i}", timeout=60.0, connect_timeout=30.0,
                                               seed=i) for i in range(edges)]
                        try:
                            for c in clients:
                                c.call("register", c.stub.Register, pb.RegisterRequest(edge_id=c.edge_id),
                                       timeout=30.0, wait_for_ready=True)
                            start = time.perf_counter()
                            for seq in range(count):  # interleaved, as concurrent edges arrive
                                for c in clients:
                                    c.upload(images, ent, seq, seen=(seq + 1) * n)
                            if not server.cloud.service.wait_idle(timeout=600.0):
                                raise RuntimeError("the cloud did not finish learning the uploads in 600 s")
                            wall = time.perf_counter() - start
                            stats = server.cloud.service.stats()
                        finally:
                            for c in clients:
                                c.close()
                    steps = sum(v.steps for v in stats.learners.values())
                    per[variant][edges].append({"wall_s": wall, "steps": steps, "steps_per_s": steps / wall,
                                                "uploads_learnt_per_s": stats.samples / wall})
                    log.info("learning: repeat %d, %d edge(s), %s: %.1f steps/s, %.0f uploads learnt/s",
                             rep + 1, edges, variant, steps / wall, stats.samples / wall)
    finally:
        torch.set_num_threads(threads_before)
    out: dict[str, dict[str, Any]] = {}
    for variant, by_e in per.items():
        threads, channels_last = _learn_variant(variant, args)
        out[variant] = {str(e): {"edges": e, "threads": threads, "channels_last": channels_last,
                                 "steps_per_s": statistics.median(r["steps_per_s"] for r in reps),
                                 "uploads_learnt_per_s": statistics.median(r["uploads_learnt_per_s"] for r in reps),
                                 "repeats": reps} for e, reps in by_e.items()}
    for e in args.learn_edges:
        base = out["before"][str(e)]["steps_per_s"]
        for variant in LEARN_VARIANTS:
            out[variant][str(e)]["speedup_vs_before"] = out[variant][str(e)]["steps_per_s"] / base
    return out


def bench_update_latency(pool: EdgePool, models: Models, args: argparse.Namespace) -> dict:
    """Cloud step done → applied at one real edge, against the real CloudServer."""
    with _Server("cloud", models, args) as server:
        res = pool.run(0, {"kind": "updates", "address": server.address, "edge_id": "edge-upd",
                           "model": str(models.onnx), "batch": args.cloud_batch, "updates": args.updates,
                           "timeout_s": 120.0}, timeout=args.updates * 130.0 + 60.0)
    sub = res["subscriber"]
    return {
        "updates": len(res["latencies_s"]),
        "update_latency": _stats_ms(res["latencies_s"]),
        "apply": _stats_ms(res["apply_s"]),
        "upload_to_applied": _stats_ms(res["upload_to_applied_s"]),
        "versions_applied": sub["versions_applied"],
        "updates_received": sub["updates_received"],
        "bytes_down": sub["bytes_down"],
        "bytes_per_update_received": sub["bytes_down"] / max(1, sub["updates_received"]),
        "final_version": res["final_version"],
    }


def bench_bytes(args: argparse.Namespace, measured_sizes: dict[int, dict[int, int]]) -> dict:
    """Serialized sizes: uploads as uint8 vs float32, and a ParameterUpdate vs the whole model."""
    from core.models import create_model
    from core.norm import get_norm_state

    pixels = int(np.prod(IMAGE_SHAPE))
    uploads: dict[str, Any] = {}
    for n in sorted(set(args.latency_batches) | {args.sustain_batch}):
        images, ent = _images(n, seed=n), _entropies(n, seed=n)
        seq = 2  # a sequence number the latency phase measured (after its 2 warm-up uploads)
        u8 = upload_request(images, ent, seq, "edge-lat")
        f32 = upload_request(images.astype(np.float32), ent, seq, "edge-lat")
        u8_size, f32_size = u8.ByteSize(), f32.ByteSize()
        client_size = measured_sizes.get(n, {}).get(seq)
        uploads[str(n)] = {
            "batch": n,
            "payload_bytes_uint8": len(u8.images.data),  # = n * 32 * 32 * 3
            "payload_bytes_float32": len(f32.images.data),  # = 4 * the uint8 payload
            "request_bytes_uint8": u8_size,
            "request_bytes_float32": f32_size,
            "request_bytes_uint8_cloudclient": client_size,  # what CloudClient.upload reported
            "per_sample_uint8": u8_size / n,
            "per_sample_float32": f32_size / n,
            "overhead_bytes_uint8": u8_size - n * pixels,  # ids, shape, entropies, framing
            "float32_over_uint8": f32_size / u8_size,
        }
    updates: dict[str, Any] = {}
    specs = {"edge_cnn": {}, "teacher_resnet": {"width": 32, "blocks": 2}}
    for name, kw in specs.items():
        model = create_model(name, 10, image_size=IMAGE_SHAPE[0], **kw)
        state = get_norm_state(model)
        msg = pb.ParameterUpdate(version=123, tensors=encode_state(state), created_unix=time.time(),
                                 cloud_step=123, episode=0)
        params = sum(p.numel() for p in model.parameters())
        float_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
        norm_floats = sum(int(v.size) for v in state.values())
        size = msg.ByteSize()
        updates[name] = {
            "model": name, **kw,
            "parameters": params,
            "norm_floats": norm_floats,
            "norm_tensors": len(state),
            "update_payload_bytes": 4 * norm_floats,
            "update_bytes": size,
            "model_param_bytes_fp32": 4 * params,
            "model_state_bytes_fp32": 4 * (params + float_buffers),  # + BN running statistics
            "update_over_model_params": size / (4 * params),
        }
    return {"upload": uploads, "update": updates}


# ------------------------------------------------------------------------------ report
def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The Markdown tables printed at the end (and suitable for the README)."""
    lines = _rpc_table(results, args) if "upload_latency" in results else []
    learn = results.get("learning")
    if learn:
        lines += ["", f"Cloud learning (CloudServer, per-edge students, {args.learn_samples} uploads per edge, "
                  f"B {args.cloud_batch}, median of {args.repeats})", "",
                  "| edges | " + " | ".join(f"{v} steps/s | {v} uploads learnt/s" for v in LEARN_VARIANTS)
                  + " | after / before |", "|---|" + "---|---|" * len(LEARN_VARIANTS) + "---|"]
        for e in args.learn_edges:
            row = [str(e)] + [f"{learn[v][str(e)]['steps_per_s']:.1f} | {learn[v][str(e)]['uploads_learnt_per_s']:.0f}"
                              for v in LEARN_VARIANTS]
            lines.append("| " + " | ".join(row) + f" | {learn['after'][str(e)]['speedup_vs_before']:.2f}× |")
        lines += ["", f"before: 1 torch thread, contiguous tensors; channels_last: 1 thread; after: "
                  f"{args.learn_threads} threads + channels-last"]
    return "\n".join(lines)


def _rpc_table(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lat, thr, upd, byt = (results[k] for k in ("upload_latency", "throughput", "update_latency", "bytes"))
    lines = ["Upload round trip (one `Upload` RPC via CloudClient, ms, median of repeats)", "",
             "| batch | " + " | ".join(f"{KIND_LABEL[k]} median | {KIND_LABEL[k]} p90" for k in args.kinds)
             + " | uint8 request B/sample | float32 request B/sample |",
             "|---|" + "---|---|" * len(args.kinds) + "---|---|"]
    for n in args.latency_batches:
        row = [str(n)] + [f"{lat[k][str(n)]['median_ms']:.2f} | {lat[k][str(n)]['p90_ms']:.2f}" for k in args.kinds]
        b = byt["upload"][str(n)]
        row += [f"{b['per_sample_uint8']:,.0f}", f"{b['per_sample_float32']:,.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Sustained uploads (closed loop, {args.sustain_batch} images per request, edge processes, "
              f"{args.duration_s:g} s windows, median of {args.repeats})", "",
              "| edges | " + " | ".join(f"{KIND_LABEL[k]} req/s | {KIND_LABEL[k]} samples/s | "
                                        f"{KIND_LABEL[k]} ms/req" for k in args.kinds) + " |",
              "|---|" + "---|---|---|" * len(args.kinds)]
    for e in args.edges:
        row = [str(e)]
        for k in args.kinds:
            r = thr[k][str(e)]
            ms = f"{r['latency_median_ms']:.1f}" if r["latency_median_ms"] is not None else "–"
            row.append(f"{r['requests_per_s']:,.0f} | {r['samples_per_s']:,.0f} | {ms}")
        lines.append("| " + " | ".join(row) + " |")
    if upd is not None:
        u, a, rt = upd["update_latency"], upd["apply"], upd["upload_to_applied"]
        title = f"Update latency (CloudServer step published → in force at the edge, {upd['updates']} updates)"
        lines += ["", title, "",
                  "| median ms | p90 ms | of which apply (median ms) | upload sent → applied (median ms, incl. "
                  "cloud step) | bytes per update received |", "|---|---|---|---|---|",
                  f"| {u['median_ms']:.1f} | {u['p90_ms']:.1f} | {a['median_ms']:.1f} | {rt['median_ms']:.0f} | "
                  f"{upd['bytes_per_update_received']:,.0f} |"]
    lines += ["", "Update vs whole model (serialized ParameterUpdate, fp32)", "",
              "| model | parameters | norm floats | update bytes | model fp32 param bytes | update / model |",
              "|---|---|---|---|---|---|"]
    for name, r in byt["update"].items():
        lines.append(f"| {name} | {r['parameters']:,} | {r['norm_floats']:,} | {r['update_bytes']:,} | "
                     f"{r['model_param_bytes_fp32']:,} | {r['update_over_model_params']:.1%} |")
    return lines


def _machine() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "grpc": grpc.__version__, "numpy": np.__version__, "torch": torch.__version__,
            "onnxruntime": ort.__version__, "torch_threads": torch.get_num_threads()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke settings: 1 repeat, few uploads, 1 and 2 edges, 3 updates, a narrow teacher")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latency-batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--latency-uploads", type=int, default=100, help="timed uploads per batch size and repeat")
    p.add_argument("--edges", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--sustain-batch", type=int, default=16, help="images per request in the sustained runs")
    p.add_argument("--duration-s", type=float, default=2.0, help="measured window per sustained trial")
    p.add_argument("--warmup-s", type=float, default=0.5, help="uploads before the window are not counted")
    p.add_argument("--updates", type=int, default=15, help="updates timed for the update latency (>= 10)")
    p.add_argument("--cloud-batch", type=int, default=16, help="the CEMA learner's batch (one version per batch)")
    p.add_argument("--teacher-width", type=int, default=32)
    p.add_argument("--teacher-blocks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the cloud (the CLI's default)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--learn-edges", type=int, nargs="+", default=[1, 4], help="edges in the cloud-learning runs")
    p.add_argument("--learn-samples", type=int, default=320, help="uploads per edge in a cloud-learning run")
    p.add_argument("--learn-threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads of the 'after' cloud-learning variant")
    p.add_argument("--only-learning", action="store_true", help="measure the cloud learning alone")
    p.add_argument("--out", type=Path, default=Path("runs/bench/cloud_edge.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.latency_uploads, args.edges = 1, 5, [1, 2]
        args.duration_s, args.warmup_s, args.updates = 0.5, 0.2, 3
        args.teacher_width, args.teacher_blocks = 8, 1
        args.learn_edges, args.learn_samples = [1, 2], 64
    if min(args.latency_batches + args.edges + [args.repeats, args.latency_uploads, args.updates]) < 1:
        p.error("counts must be >= 1")
    if args.duration_s <= 0 or args.warmup_s < 0:
        p.error("--duration-s must be > 0 and --warmup-s >= 0")
    args.latency_batches = sorted(set(args.latency_batches))
    args.edges = sorted(set(args.edges))
    args.learn_edges = sorted(set(args.learn_edges))
    if min(args.learn_edges + [args.learn_samples, args.learn_threads]) < 1:
        p.error("--learn-* values must be >= 1")
    return args


def rpc_costs(models: Models, args: argparse.Namespace) -> dict[str, Any]:
    """Upload latency, sustained uploads, update latency and bytes: the protocol's costs."""
    pool: EdgePool | None = None
    try:
        log.info("starting %d edge processes", max(args.edges))
        pool = EdgePool(max(args.edges))
        latency, sizes = bench_upload_latency(pool, models, args)
        throughput = bench_throughput(pool, models, args)
        updates = bench_update_latency(pool, models, args) if "cloud" in args.kinds else None
        log.info("update latency measured")
    finally:
        if pool is not None:
            pool.close()
    return {"upload_latency": latency, "throughput": throughput, "update_latency": updates,
            "bytes": bench_bytes(args, sizes)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("server.cloud").setLevel(logging.WARNING)  # one line per register otherwise
    logging.getLogger("edge.client").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(max(1, args.threads))
    started = time.monotonic()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        models = Models(args, Path(tmp))
        results = {} if args.only_learning else rpc_costs(models, args)
        results["learning"] = bench_learning(models, args) if "cloud" in args.kinds else None
    wall = time.monotonic() - started
    report = {
        "benchmark": "cloud_edge",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "image_shape": list(IMAGE_SHAPE), "student": "edge_cnn", "teacher": "teacher_resnet",
                     "weights": "untrained (RPC and byte costs do not depend on them)",
                     "cloud": "per-edge students, CemaConfig defaults except batch_size"},
        "machine": {**_machine(), "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())},
        "wall_s": wall,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(results, args))
    print(f"\nwrote {args.out} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
