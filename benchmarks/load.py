"""How many edges one cloud process serves, at what upload rate: simulated edges on loopback.

One real ``fedshift cloud`` process per edge count (randomly initialised models, the CEMA step, per-edge students) and, in this
process, N simulated edges as asyncio gRPC clients: each registers, keeps a ``Subscribe`` stream
open and uploads a batch of random uint8 images every ``--interval`` seconds (offered load =
N × batch / interval samples/s). A refused upload (``RESOURCE_EXHAUSTED``, the cloud's
backpressure) waits as long as the cloud's ``retry-after-ms`` hint says and is re-sent under the
same sequence number. Measured over ``--duration`` seconds per edge count, side by side in one run:

- accepted uploads/s and samples/s; p50/p99 upload latency (request sent -> ack, successful
  attempts); rejected (RESOURCE_EXHAUSTED answers) and retried counts; other errors;
- update fan-out latency: for each update an edge receives, its arrival time minus the cloud's
  ``created_unix`` (same machine, same clock), p50/p99;
- the cloud's resident memory and thread count, sampled from /proc every second (the series and
  its maximum).

The edges and the cloud share this machine's cores (the edges' protobuf work competes with the
learner), so the figures are a lower bound for a cloud on its own machine.

    python benchmarks/load.py --edges 32 256 --duration 30 --out benchmarks/results/load/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from protos.codec import GRPC_OPTIONS, RETRY_AFTER_KEY, encode_array  # noqa: E402
from protos.fedshift.v1 import edge_pb2 as pb  # noqa: E402
from protos.fedshift.v1 import edge_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("load")
ROOT = Path(__file__).resolve().parents[1]


def _proc_status(pid: int) -> tuple[int, int]:
    """(resident bytes, threads) of a process, from /proc."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class _Edge:
    """One simulated edge: a registration, an open subscription and a steady upload loop."""

    def __init__(self, stub: pb_grpc.EdgeServiceStub, edge_id: str, images: np.ndarray, interval_s: float,
                 rng: np.random.Generator) -> None:
        self.stub, self.edge_id, self.images, self.interval_s = stub, edge_id, images, interval_s
        self.rng = rng
        self.latencies: list[float] = []
        self.fanout: list[float] = []
        self.accepted = self.samples = self.rejected = self.retried = self.errors = self.updates = 0

    async def run(self, stop: asyncio.Event, measuring: asyncio.Event) -> None:
        await self.stub.Register(pb.RegisterRequest(edge_id=self.edge_id), timeout=60, wait_for_ready=True)
        subscription = asyncio.create_task(self._subscribe(stop, measuring))
        await asyncio.sleep(self.rng.uniform(0, self.interval_s))  # edges do not upload in lockstep
        seq = 0
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                await self._upload(seq, stop, measuring)
                seq += 1
                await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))
        finally:
            subscription.cancel()

    async def _upload(self, seq: int, stop: asyncio.Event, measuring: asyncio.Event) -> None:
        request = pb.UploadRequest(edge_id=self.edge_id, sequence=seq, images=encode_array(self.images),
                                   entropies=[1.0] * len(self.images), seen=(seq + 1) * len(self.images))
        first = True
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                reply = await self.stub.Upload(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.errors += int(measuring.is_set())
                    return
                self.rejected += int(measuring.is_set())
                wait = 0.5
                for key, value in exc.trailing_metadata() or ():
                    if key == RETRY_AFTER_KEY:
                        wait = float(value) / 1000
                await asyncio.sleep(wait * self.rng.uniform(1.0, 1.5))
                first = False
                continue
            if measuring.is_set():
                self.latencies.append(time.monotonic() - t0)
                self.accepted += 1
                self.samples += int(reply.accepted)
                self.retried += int(not first)
            return

    async def _subscribe(self, stop: asyncio.Event, measuring: asyncio.Event) -> None:
        try:
            async for update in self.stub.Subscribe(pb.SubscribeRequest(edge_id=self.edge_id)):
                if measuring.is_set():
                    self.updates += 1
                    self.fanout.append(time.time() - update.created_unix)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return


async def _drive(address: str, n: int, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    """N edges for warm-up + duration seconds; memory and threads sampled every second."""
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8)
    channels = [grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) for _ in range(min(n, args.channels))]
    stubs = [pb_grpc.EdgeServiceStub(c) for c in channels]
    edges = [_Edge(stubs[i % len(stubs)], f"load-{n}-{i}", images, args.interval, np.random.default_rng(i))
             for i in range(n)]
    stop, measuring = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(e.run(stop, measuring)) for e in edges]
    memory: list[dict[str, float]] = []
    t_start = time.monotonic()
    await asyncio.sleep(args.warmup)
    measuring.set()
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < args.duration:
        rss, threads = _proc_status(pid)
        memory.append({"t_s": round(time.monotonic() - t_start, 1), "rss_mb": round(rss / 2**20, 1),
                       "threads": threads})
        log.info("%d edges: %.0f s, cloud RSS %.0f MB, %d threads, %d uploads accepted, %d rejected", n, elapsed,
                 rss / 2**20, threads, sum(e.accepted for e in edges), sum(e.rejected for e in edges))
        await asyncio.sleep(1.0)
    measuring.clear()
    measured = time.monotonic() - t0
    stop.set()
    await asyncio.wait(tasks, timeout=60)
    for task in tasks:
        task.cancel()
    for channel in channels:
        await channel.close()
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    latencies = [x for e in edges for x in e.latencies]
    fanout = [x for e in edges for x in e.fanout]
    return {
        "edges": n, "measured_s": round(measured, 1),
        "offered_samples_per_s": round(n * args.batch / args.interval, 1),
        "uploads_per_s": round(sum(e.accepted for e in edges) / measured, 2),
        "samples_per_s": round(sum(e.samples for e in edges) / measured, 1),
        "upload_latency_ms": {"p50": _ms(_percentile(latencies, 50)), "p99": _ms(_percentile(latencies, 99)),
                              "n": len(latencies)},
        "fanout_latency_ms": {"p50": _ms(_percentile(fanout, 50)), "p99": _ms(_percentile(fanout, 99)),
                              "n": len(fanout)},
        "updates_received": sum(e.updates for e in edges),
        "rejected": sum(e.rejected for e in edges), "retried": sum(e.retried for e in edges),
        "errors": sum(e.errors for e in edges), "edges_failed": len(failed),
        "cloud_rss_mb_max": max(m["rss_mb"] for m in memory), "cloud_threads_max": max(m["threads"] for m in memory),
        "cloud_memory": memory,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def _start_cloud(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen, str]:
    """A real ``fedshift cloud`` with randomly initialised models (the compute is a trained one's)."""
    import torch

    from core.models import create_model

    torch.manual_seed(args.seed)
    weights = {}
    for name in ("edge_cnn", "teacher_resnet"):
        weights[name] = workdir / f"{name}.pt"
        torch.save(create_model(name, args.num_classes, image_size=args.image_size).state_dict(), weights[name])
    port_file = workdir / "port"
    cmd = [sys.executable, "-m", "server.cloud_cli", "--port", "0", "--port-file", str(port_file), "--insecure",
           "--student-weights", str(weights["edge_cnn"]), "--teacher-weights", str(weights["teacher_resnet"]),
           "--num-classes", str(args.num_classes), "--image-size", str(args.image_size), "--method", args.method,
           "--threads", str(args.cloud_threads), "--max-edges", str(max(args.edges)),
           "--replay-size", str(args.replay_size), "--out", str(workdir / "cloud")]
    log.info("cloud: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=open(workdir / "cloud.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    deadline = time.monotonic() + 300
    while not port_file.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the cloud did not start: {(workdir / 'cloud.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edges", type=int, nargs="+", default=[32, 256])
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per edge count")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (registration, first steps)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between one edge's uploads")
    p.add_argument("--batch", type=int, default=16, help="samples per upload")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--method", default="cema", choices=("cema", "tent"))
    p.add_argument("--replay-size", type=int, default=2000, help="per-edge replay (the cloud's --replay-size)")
    p.add_argument("--cloud-threads", type=int, default=1)
    p.add_argument("--channels", type=int, default=64, help="gRPC channels the simulated edges share")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = []
    for n in args.edges:  # a fresh cloud per edge count: its memory is that count's alone
        with tempfile.TemporaryDirectory(prefix="fedshift-load-") as tmp:
            proc, address = _start_cloud(args, Path(tmp))
            try:
                rows.append(asyncio.run(_drive(address, n, args, proc.pid)))
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    result = {"benchmark": "load", "config": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}
    print("| edges | offered samples/s | accepted uploads/s | samples/s | upload p50/p99 ms | fan-out p50/p99 ms "
          "| rejected | retried | cloud RSS max MB | cloud threads max |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        up, fan = r["upload_latency_ms"], r["fanout_latency_ms"]
        print(f"| {r['edges']} | {r['offered_samples_per_s']} | {r['uploads_per_s']} | {r['samples_per_s']} | "
              f"{up['p50']} / {up['p99']} | {fan['p50']} / {fan['p99']} | {r['rejected']} | {r['retried']} | "
              f"{r['cloud_rss_mb_max']} | {r['cloud_threads_max']} |")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
