"""Edge node and ``fedshift edge`` end to end against the fake cloud; the edge stays torch-free."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _edge_fake import FakeCloud, perturbed

from edge.client import CloudClient, RetryPolicy
from edge.node import TIMELINE_KEYS, EdgeNode, NodeConfig
from edge.runtime import EdgeRuntime
from edge.selection import EntropySelector, SelectionConfig, softmax_entropy
from edge.sources import EdgeBatch, NpzSource, save_stream_npz
from edge.summary import EdgeSummary
from protos.contract import StreamSegment, file_sha256, load_stream_npz
from simulations.cli import main as fedshift

ROOT = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05, max_total_s=5.0)
SUMMARY_KEYS = {  # the JSON a summary file holds (edge.summary.EdgeSummary)
    "schema", "edge_id", "server", "method", "selection", "model", "seen", "batches", "kept", "excluded",
    "uploaded", "upload_failed", "upload_dropped", "uploads_dropped", "upload_unsent", "upload_pending",
    "upload_outages", "uploads", "upload_errors", "upload_retries", "reregistrations", "duplicates",
    "bytes_up", "updates",
    "reset_versions_applied", "initial_version", "final_version", "cloud_version", "resets", "episode",
    "labelled", "correct", "per_corruption", "per_shift", "mean_entropy", "e_max_final", "metrics_reports",
    "metrics_errors", "sync_waits", "sync_timeouts", "sync_wait_s", "wall_s", "stopped_early", "error", "timeline",
    # derived, for people reading the file
    "accuracy", "kept_rate", "upload_rate", "bytes_down", "versions_applied", "samples_per_s",
}


@pytest.fixture(scope="module")
def stream_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    segs = [(name, 5, rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, n))
            for name, n in (("gaussian_noise", 20), ("fog", 13))]
    return save_stream_npz(tmp_path_factory.mktemp("stream") / "s.npz", segs, "reset")


def _node(runtime, source, client, method="all", **kw) -> EdgeNode:
    sel = EntropySelector(SelectionConfig(num_classes=runtime.num_classes, method=method,
                                          random_rate=kw.pop("random_rate", None), warmup=8))
    edge_id = kw.pop("edge_id", None)
    return EdgeNode(runtime, source, client, sel, config=NodeConfig(**kw), edge_id=edge_id)


def test_end_to_end_counts_resets_and_bytes(cloud, model_path, stream_path) -> None:
    fake, address = cloud
    runtime = EdgeRuntime(model_path)
    fake.initial_state = runtime.norm_state()  # Reset publishes the restored state, as the cloud does
    fake.fail_uploads, fake.record_then_fail = 2, True  # two lost replies: re-sent, counted once
    with CloudClient(address, "edge-1", retry=FAST) as client:
        summary = _node(runtime, NpzSource(stream_path, 8), client, metrics_every=2).run()
    on_disk = json.loads(summary.to_json())
    assert SUMMARY_KEYS == set(on_disk) and set(on_disk["timeline"]) == set(TIMELINE_KEYS)
    assert EdgeSummary.from_json(summary.to_json()) == summary
    assert summary.seen == 33 and summary.batches == 3 + 2
    assert summary.uploaded == summary.kept == 33  # method "all"
    assert sum(fake.accepted.values()) == 33 and summary.uploads == len(fake.accepted) == 5
    assert summary.duplicates == 1 and summary.upload_retries == 2
    assert summary.bytes_up == sum(fake.request_bytes.values())
    assert sorted(seq for _, seq in fake.accepted) == [1, 2, 3, 4, 5]  # from register's next_sequence
    assert fake.resets == [("edge-1", 1), ("edge-1", 2)] and summary.resets == 2
    assert fake.episodes_seen == [1, 1, 1, 2, 2] and fake.labels_seen == 33
    assert summary.versions_applied >= 2 and summary.final_version == 2
    assert summary.per_corruption["gaussian_noise"].seen == 20
    assert summary.per_shift["fog@5"].uploaded == 13
    assert summary.labelled == 33 and 0 <= summary.accuracy <= 1
    assert summary.accuracy == pytest.approx(
        sum(v.correct for v in summary.per_corruption.values()) / 33)
    assert list(summary.timeline.seen) == [8, 16, 20, 28, 33]
    assert fake.metrics and dict(fake.metrics[-1].values)["final"] == 1.0
    assert dict(fake.metrics[-1].values)["seen"] == 33
    assert summary.model.sha256 == file_sha256(model_path)


class _PublishingSource:
    """Publishes a new parameter version after the second batch and waits until it is in force."""

    def __init__(self, inner, fake: FakeCloud, runtime: EdgeRuntime) -> None:
        self.inner, self.fake, self.runtime = inner, fake, runtime

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            yield batch
            if i == 1:
                self.fake.wait_subscribers(1)
                # an update of the episode before the reset is stale; the current episode's is applied
                self.fake.publish(perturbed(self.runtime.norm_state(), 6), version=9, episode=0)
                self.fake.publish(perturbed(self.runtime.norm_state(), 7), version=10, episode=1)
                deadline = time.monotonic() + 5
                while self.runtime.version < 10 and time.monotonic() < deadline:
                    time.sleep(0.01)


def test_updates_apply_between_batches_with_cema_selection(cloud, model_path, tmp_path) -> None:
    fake, address = cloud
    runtime = EdgeRuntime(model_path)
    rng = np.random.default_rng(1)
    path = save_stream_npz(tmp_path / "c.npz", [("x", 3, rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), None)],
                           "continual")
    with CloudClient(address, "edge-2", retry=FAST) as client:
        node = _node(runtime, _PublishingSource(NpzSource(path, 8), fake, runtime), client, method="cema")
        summary = node.run()
    # first batch resets (episode 1, version 1 from the fake); the update lands before batch 3
    assert list(summary.timeline.version) == [1, 1, 10, 10, 10]
    assert summary.final_version == 10 and summary.updates.updates_received == 2
    assert summary.updates.episode_ignored == 1 and summary.versions_applied == 2  # reset state + v10
    assert summary.uploaded == summary.kept == sum(list(summary.timeline.kept))
    assert summary.kept + summary.excluded.total == summary.seen == 40
    assert all(e is not None and e > 0 for e in list(summary.timeline.e_max))
    assert summary.accuracy is None and summary.labelled == 0


def test_an_upload_that_outlasts_the_retry_policy_stays_buffered_and_is_sent(cloud, model_path,
                                                                              stream_path) -> None:
    """Before the upload buffer this upload was dropped (``upload_failed``); now a transient failure
    never drops one: the sender keeps it at the head and sends it again, under the same sequence."""
    fake, address = cloud
    fake.fail_uploads = 2  # the first upload outlasts a 2-attempt policy
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02, max_total_s=1.0)
    with CloudClient(address, "edge-3", retry=policy) as client:
        summary = _node(EdgeRuntime(model_path), NpzSource(stream_path, 8), client, limit=16).run()
    assert summary.seen == 16 and summary.upload_failed == 0 and summary.upload_errors == 0
    assert summary.uploaded == summary.kept == 16 and summary.upload_retries == 2 and summary.upload_outages == 1
    assert list(fake.accepted) == [("edge-3", 1), ("edge-3", 2)]  # oldest first, each sequence once


class _ForgettingSource:
    """The cloud forgets every edge (a restart without state) after batch ``after``."""

    def __init__(self, inner, fake: FakeCloud, after: int) -> None:
        self.inner, self.fake, self.after = inner, fake, after

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            yield batch
            if i == self.after:
                self.fake.forget()


def test_an_edge_registers_again_when_the_cloud_forgot_it(cloud, model_path, stream_path) -> None:
    """Issue 12: "edge is not registered" after a cloud restart no longer kills the edge: it
    registers again, re-sends that upload under the same sequence, and carries on to the end;
    its episode is brought back to the cloud (the reset protocol)."""
    fake, address = cloud
    with CloudClient(address, "edge-r", retry=FAST) as client:
        summary = _node(EdgeRuntime(model_path), _ForgettingSource(NpzSource(stream_path, 8), fake, 1),
                        client).run()
    assert summary.error is None and summary.reregistrations == 1
    assert summary.uploaded == summary.kept == summary.seen == 33 and summary.upload_failed == 0
    assert sum(fake.accepted.values()) == 33  # every sample counted once
    assert [r.edge_id for r in fake.registered] == ["edge-r", "edge-r"]
    assert fake.resets[-1] == ("edge-r", summary.episode)  # the cloud was brought to the edge's episode


def test_forward_only_without_cloud(model_path, stream_path) -> None:
    runtime = EdgeRuntime(model_path)
    summary = _node(runtime, NpzSource(stream_path, 8), None, method="random", random_rate=0.5,
                    limit=21, edge_id="solo").run()
    assert summary.seen == 21 and list(summary.timeline.n) == [8, 8, 4, 1]  # the limit cuts a batch
    assert summary.uploaded == 0 and summary.bytes_up == 0 and summary.kept > 0
    assert summary.edge_id == "solo" and summary.server is None and summary.resets == 2
    assert summary.final_version == summary.initial_version == 0
    expected = np.concatenate([b.labels for b in NpzSource(stream_path, 64)])[:21]
    preds = np.concatenate([runtime.predict(b.images).argmax(1) for b in NpzSource(stream_path, 64)])[:21]
    assert summary.correct == int((preds == expected).sum())


def test_stop_ends_at_a_batch_boundary(model_path) -> None:
    node_ref = {}

    class Endless:
        def __iter__(self):
            while True:
                yield EdgeBatch(np.zeros((4, 8, 8, 3), np.uint8), None, "x", 1, False)
                if node_ref["node"].summary(timeline=False).seen >= 12:
                    node_ref["node"].stop()

    node = _node(EdgeRuntime(model_path), Endless(), None)
    node_ref["node"] = node
    summary = node.run()
    assert summary.stopped_early and summary.seen == 16


def test_cli_without_cloud_writes_summary(model_path, stream_path, tmp_path) -> None:
    out = tmp_path / "o" / "summary.json"
    rc = fedshift(["edge", "--server", "none", "--model", str(model_path), "--source", f"npz:{stream_path}",
                   "--method", "cema", "--redundancy", "0.9", "--batch-size", "16", "--out", str(out)])
    assert rc == 0
    summary = EdgeSummary.read(out)
    assert summary.seen == 33 and summary.selection.redundancy == 0.9 and summary.uploaded == 0


def test_cli_against_cloud_and_bad_arguments(cloud, model_path, stream_path, tmp_path, capsys) -> None:
    fake, address = cloud
    out = tmp_path / "s.json"
    rc = fedshift(["edge", "--server", address, "--model", str(model_path), "--source", f"npz:{stream_path}",
                   "--edge-id", "cli-edge", "--method", "all", "--limit", "20", "--out", str(out), "--insecure"])
    assert rc == 0
    summary = EdgeSummary.read(out)
    assert summary.uploaded == summary.kept == 20 == sum(fake.accepted.values())
    assert summary.edge_id == "cli-edge"
    assert fedshift(["edge", "--server", "none", "--model", str(model_path), "--source", "webcam:0"]) == 2
    assert fedshift(["edge", "--server", "none", "--model", str(model_path), "--source", f"npz:{stream_path}",
                     "--method", "random"]) == 2
    assert "random_rate" in capsys.readouterr().err
    fake.token = "secret"  # a refused edge fails with status 1 and still writes its summary
    rc = fedshift(["edge", "--server", address, "--model", str(model_path), "--source", f"npz:{stream_path}",
                   "--token", "wrong", "--out", str(out), "--insecure"])
    assert rc == 1 and "UNAUTHENTICATED" in EdgeSummary.read(out).error
    # plaintext is refused unless asked for, with a message that says how to fix it
    assert fedshift(["edge", "--server", address, "--model", str(model_path), "--source", f"npz:{stream_path}"]) == 2
    assert "--tls-ca" in capsys.readouterr().err


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "ORT_DISABLE_TELEMETRY": "1"}


def test_edge_imports_without_torch_or_core() -> None:
    code = ("import sys; sys.modules['torch'] = None; sys.modules['core'] = None; "
            "import edge.node, edge.client, edge.selection, edge.sources, edge.cli, edge.runtime, edge.watch, "
            "edge.camera, edge.images")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def _sigterm_after(cmd: list[str], frames: int) -> tuple[int, float]:
    """Start an edge process reading ``frames`` 8x8x3 frames from stdin, SIGTERM it once its
    progress line (logged every batch) says it saw them all; its exit code and how long it took."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(np.zeros((frames, 8, 8, 3), np.uint8).tobytes())
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline().decode()
            lines.append(line)
            if f"seen {frames}," in line or not line:
                break
        assert any(f"seen {frames}," in ln for ln in lines), "".join(lines)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        return rc, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stderr.close()


def test_sigterm_while_waiting_on_stdin_writes_summary(model_path, tmp_path) -> None:
    """A torch-free edge process: two batches of frames, then SIGTERM while it waits for more."""
    out = tmp_path / "summary.json"
    code = ("import sys; sys.modules['torch'] = None; sys.modules['core'] = None; "
            "from simulations.cli import main; sys.exit(main(sys.argv[1:]))")
    rc, _ = _sigterm_after([sys.executable, "-c", code, "edge", "--server", "none", "--model", str(model_path),
                            "--source", "stdin:8x8x3", "--batch-size", "2", "--method", "all", "--log-every", "0",
                            "--out", str(out)], 4)
    assert rc == 0
    summary = EdgeSummary.read(out)
    assert summary.stopped_early and summary.seen == 4 and summary.batches == 2


def test_sigterm_with_the_cloud_unreachable_flushes_bounded_and_exits_0(cloud, model_path, tmp_path) -> None:
    """Graceful shutdown of an edge whose cloud stopped answering: SIGTERM ends the loop at a batch
    boundary, the buffered uploads get ``--flush-timeout`` seconds, what is left is counted as
    unsent, the summary is written and the exit code is 0, within a bounded time."""
    fake, address = cloud
    fake.fail_uploads = 10**9  # UNAVAILABLE, for ever
    out = tmp_path / "summary.json"
    rc, took = _sigterm_after([sys.executable, "-m", "simulations.cli", "edge", "--server", address, "--model",
                               str(model_path), "--source", "stdin:8x8x3", "--batch-size", "2", "--method", "all",
                               "--log-every", "0", "--flush-timeout", "1", "--insecure", "--out", str(out)], 6)
    assert rc == 0 and took < 30
    summary = EdgeSummary.read(out)
    assert summary.stopped_early and summary.seen == summary.kept == 6
    # (the sender may not have met the outage yet when SIGTERM came: a busy machine)
    assert summary.uploaded == 0 and summary.upload_unsent == 6 and summary.upload_outages <= 1
    assert not fake.accepted


def test_stop_from_another_thread_during_a_blocking_source_is_graceful(model_path) -> None:
    gate = threading.Event()

    class Slow:
        def __iter__(self):
            yield EdgeBatch(np.zeros((2, 8, 8, 3), np.uint8), None, "x", 1, True)
            gate.wait(5)
            yield EdgeBatch(np.zeros((2, 8, 8, 3), np.uint8), None, "x", 1, False)
            yield EdgeBatch(np.zeros((2, 8, 8, 3), np.uint8), None, "x", 1, False)

    node = _node(EdgeRuntime(model_path), Slow(), None)
    t = threading.Thread(target=lambda: (time.sleep(0.1), node.stop(), gate.set()))
    t.start()
    try:
        summary = node.run()
    finally:
        t.join()
    assert summary.stopped_early and summary.seen == 4  # the batch in hand is finished, no more


def test_lockstep_predicts_each_batch_with_the_step_on_the_previous(cloud, model_path, stream_path) -> None:
    fake, address = cloud
    runtime = EdgeRuntime(model_path)
    fake.step_on_upload = perturbed(runtime.norm_state(), 3)  # each upload -> one "cloud step" 50 ms later
    with CloudClient(address, "edge-sync", retry=FAST) as client:
        node = _node(runtime, NpzSource(stream_path, 8), client, limit=20, sync_timeout_s=5.0)
        summary = node.run()
    # batch 1: reset -> v1; each upload then yields the next version before the next batch
    assert list(summary.timeline.version) == [1, 2, 3]
    assert summary.sync_waits == 3 and summary.sync_timeouts == 0 and summary.sync_wait_s > 0


@pytest.mark.parametrize("protocol", ["reset", "continual"])
def test_selector_restarts_at_each_episode_of_the_reset_protocol_only(model_path, stream_path, tmp_path,
                                                                      protocol) -> None:
    """Warm-up 8, batches of 10: batch 3 opens the second corruption. Under ``reset`` its threshold
    is E0 again (a fresh warm-up) and the final running mean covers that episode alone; under
    ``continual`` the threshold keeps adapting and the mean covers the whole stream."""
    segs = NpzSource(stream_path, 64).stream.segments
    path = save_stream_npz(tmp_path / "s.npz", segs, protocol)
    runtime = EdgeRuntime(model_path)
    summary = _node(runtime, NpzSource(path, 10), None, method="cema").run()
    e0 = summary.selection.e0
    e_max = list(summary.timeline.e_max)
    assert e_max[0] == pytest.approx(e0) and e_max[1] != pytest.approx(e0)
    _, h = softmax_entropy(np.concatenate([runtime.predict(s.images) for s in segs]))
    if protocol == "reset":
        assert summary.resets == 2 and e_max[2] == pytest.approx(e0) and e_max[3] != pytest.approx(e0)
        assert summary.mean_entropy == pytest.approx(h[20:].mean(), rel=1e-5)
    else:
        assert summary.resets == 1 and e_max[2] != pytest.approx(e0)
        assert summary.mean_entropy == pytest.approx(h.mean(), rel=1e-5)


def test_oracle_reads_reference_labels_from_the_stream(model_path, tmp_path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    runtime = EdgeRuntime(model_path)
    preds = runtime.predict(images).argmax(1)
    reference = np.where(np.arange(30) % 3 == 0, (preds + 1) % runtime.num_classes, preds)  # 10 disagree
    seg = StreamSegment("fog", 5, images, rng.integers(0, 4, 30), reference)
    path = save_stream_npz(tmp_path / "o.npz", [seg], "reset")
    assert np.array_equal(load_stream_npz(path).segments[0].reference, reference)
    summary = _node(runtime, NpzSource(path, 7), None, method="oracle").run()
    assert summary.kept == 10 and summary.excluded.skipped == 20
