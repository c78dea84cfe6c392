"""Kill -9 of a real ``fedshift cloud`` process mid-stream, restarted on the same port and
checkpoint folder, while a real edge (ONNX Runtime, gRPC) streams: the edge carries on by itself,
every upload is counted once at the cloud, none is lost, and versions never go backwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from core.export import export_onnx
from core.models import create_model
from edge.client import CloudClient, RetryPolicy
from edge.node import EdgeNode, NodeConfig
from edge.runtime import EdgeRuntime
from edge.selection import EntropySelector, SelectionConfig
from edge.sources import EdgeBatch
from server.checkpoint import VERSION_BLOCK
from server.stats import CloudStats

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


class _SlowSource:
    """A stream that takes a while (so the cloud can die in the middle of it) and, after its last
    batch, holds the edge open until ``hold`` is set (so that it outlives the restart)."""

    def __init__(self, batches: int, batch_size: int, delay_s: float, hold: threading.Event) -> None:
        self.batches, self.batch_size, self.delay_s, self.hold = batches, batch_size, delay_s, hold

    def __iter__(self):
        rng = np.random.default_rng(0)
        for _ in range(self.batches):
            time.sleep(self.delay_s)
            images = rng.integers(0, 256, (self.batch_size, SIZE, SIZE, 3), dtype=np.uint8)
            yield EdgeBatch(images, rng.integers(0, 10, self.batch_size), "gaussian_noise", 5, False)
        self.hold.wait(120)


def _cloud(tmp_path: Path, weights: Path, model: Path, port: int, out: str) -> tuple[subprocess.Popen, int]:
    port_file = tmp_path / f"{out}.port"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cloud_cli", "--port", str(port), "--port-file", str(port_file),
         "--method", "tent", "--student-weights", str(weights), "--edge-model", str(model), "--image-size",
         str(SIZE), "--batch-size", "4", "--out", str(tmp_path / out), "--checkpoint-dir", str(tmp_path / "ckpt"),
         "--checkpoint-every-s", "0.5", "--insecure"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while not port_file.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert port_file.is_file(), proc.communicate()[0] if proc.poll() is not None else "no port file"
    return proc, int(port_file.read_text())


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_kill9_of_the_cloud_mid_stream_loses_no_upload_and_the_edge_carries_on(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = create_model("edge_cnn", 10, image_size=SIZE)
    weights, model = tmp_path / "edge.pt", tmp_path / "edge.onnx"
    torch.save(student.state_dict(), weights)
    export_onnx(student, model, (3, SIZE, SIZE), model_name="edge_cnn", batch_stats=True)
    first, port = _cloud(tmp_path, weights, model, 0, "before")
    second = None
    try:
        runtime = EdgeRuntime(model)
        retry = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.5, max_total_s=120)
        client = CloudClient(f"127.0.0.1:{port}", "e0", retry=retry, connect_timeout=60)
        selector = EntropySelector(SelectionConfig(num_classes=10, method="all"))
        hold = threading.Event()
        node = EdgeNode(runtime, _SlowSource(60, 8, 0.05, hold), client, selector, config=NodeConfig(log_every_s=1.0, flush_timeout_s=120))
        result: dict = {}
        edge = threading.Thread(target=lambda: result.update(summary=node.run()), daemon=True)
        edge.start()
        deadline = time.monotonic() + 60
        while node.summary(timeline=False).uploads < 15 and edge.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        killed_at = node.summary(timeline=False)
        assert edge.is_alive() and killed_at.uploads >= 15, "the edge ended before the cloud could be killed"
        first.send_signal(signal.SIGKILL)
        first_output = first.communicate(timeout=30)[0]
        assert first.returncode == -signal.SIGKILL
        assert "checkpoint 1:" in first_output  # a periodic snapshot happened: restore = snapshot + journal
        second, port2 = _cloud(tmp_path, weights, model, port, "after")
        assert port2 == port
        # the edge, still running, gets the restarted cloud's versions: above every earlier one
        assert node.subscriber is not None and node.subscriber.wait_for_version(VERSION_BLOCK + 1, 120)
        hold.set()
        edge.join(180)
        assert not edge.is_alive()
        client.close()
        output = _stop(second)  # SIGTERM: stop accepting, end the streams, a last snapshot, exit 0
        assert second.returncode == 0, output
        assert (tmp_path / "ckpt" / "snapshot.pt").is_file() and "stopped" in output
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    summary = result["summary"]
    stats = CloudStats.read(tmp_path / "after" / "cloud" / "stats.json")
    # the edge carried on by itself: everything it saw was uploaded, nothing failed
    assert summary.seen == summary.kept == summary.uploaded == 480 and summary.upload_failed == 0
    assert summary.reregistrations == 0  # the restarted cloud knew the edge from its checkpoint
    assert summary.updates.reconnects >= 1
    # exact accounting: each upload counted once, none lost, every sample reached the learner once
    assert stats.uploads == summary.uploads and stats.samples == summary.uploaded
    assert stats.edges["e0"].seen == 480
    learner = stats.learners["e0"]  # at SIGTERM, some accepted samples may still wait for the learner ...
    assert learner.learned_samples + learner.pending_samples == 480
    third, _ = _cloud(tmp_path, weights, model, 0, "last")  # ... the shutdown's snapshot kept them
    assert _stop(third) and third.returncode == 0
    last = CloudStats.read(tmp_path / "last" / "cloud" / "stats.json")
    assert last.learners["e0"].learned_samples == 480 and last.learners["e0"].pending_samples == 0
    assert last.samples == 480 and last.restored_records == 0  # a clean shutdown: all in the snapshot
    assert stats.restored_records > 0 or "restored from" in output
    # versions never went backwards at the edge, and the restarted cloud's are above all earlier ones
    versions = list(summary.timeline.version)
    assert versions == sorted(versions) and summary.updates.stale_ignored == 0
    assert summary.final_version > VERSION_BLOCK
    assert "restored from" in output
