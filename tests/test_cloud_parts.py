"""The cloud's parts on their own, without a server: what an upload and a metric report may hold
(``server.validation``), the learner thread and its queue (``server.worker``), and the
TensorBoard events (``server.telemetry``). The served behaviour is ``test_cloud_server``."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from protos.codec import encode_array
from protos.fedshift.v1 import edge_pb2 as pb
from server.edges import LearnerSlot, QueuedUpload
from server.telemetry import CloudTelemetry
from server.validation import MAX_METRICS, metric_values, upload_arrays
from server.worker import LearnerWorker

SHAPE = (8, 8, 3)


def _request(n: int = 3, shape: tuple[int, ...] = SHAPE, **kw) -> pb.UploadRequest:
    images = np.random.default_rng(n).integers(0, 256, (n, *shape), dtype=np.uint8)
    return pb.UploadRequest(edge_id="e", sequence=0, images=encode_array(images), **kw)


def _arrays(request: pb.UploadRequest) -> tuple[np.ndarray, np.ndarray]:
    return upload_arrays(request, image_shape=SHAPE, max_samples=4, num_classes=10)


def test_upload_arrays_accepts_a_valid_upload_and_says_what_is_wrong_otherwise() -> None:
    images, labels = _arrays(_request(3, labels=[0, 9, 4], entropies=[0.1, 0.2, 0.3]))
    assert images.shape == (3, *SHAPE) and images.dtype == np.uint8 and labels.tolist() == [0, 9, 4]
    assert _arrays(_request(2))[1].shape == (0,)  # labels are optional
    for request, words in [(_request(5), "at most 4"), (_request(2, shape=(4, 4, 3)), "takes"),
                           (_request(2, entropies=[0.1]), "entropies"),
                           (_request(2, entropies=[0.1, float("nan")]), "finite"),
                           (_request(2, labels=[1]), "labels"), (_request(2, labels=[1, 10]), "0..9"),
                           (_request(2, labels=[-1, 0]), "0..9")]:
        with pytest.raises(ValueError, match=words):
            _arrays(request)


def test_metric_values_bound_the_names_an_edge_keeps() -> None:
    assert metric_values({"acc": 0.5, "edge/seen": 3.0}, known=()) == {"acc": 0.5, "edge/seen": 3.0}
    with pytest.raises(ValueError, match="finite"):
        metric_values({"acc": float("inf")}, known=())
    with pytest.raises(ValueError, match="must match"):
        metric_values({"bad name": 1.0}, known=())
    known = [f"m{i}" for i in range(MAX_METRICS)]
    assert metric_values({"m0": 1.0}, known=known) == {"m0": 1.0}  # a known name is no new one
    with pytest.raises(ValueError, match=f"at most {MAX_METRICS}"):
        metric_values({"new": 1.0}, known=known)


class _Learner:
    """What the worker needs of a CemaLearner: add, step (one per 2 queued samples), sizes."""

    def __init__(self) -> None:
        self.queue: list[int] = []
        self.replay: list[int] = []
        self.added = 0

    def norm_state(self) -> dict[str, np.ndarray]:
        return {"bn.weight": np.ones(2, np.float32)}

    @property
    def queue_size(self) -> int:
        return len(self.queue)

    def add(self, images: torch.Tensor, labels: np.ndarray) -> None:
        self.queue += [0] * len(images)
        self.added += len(images)

    def step(self) -> dict[str, float] | None:
        if len(self.queue) < 2:
            return None
        del self.queue[:2]
        return {"loss": 1.0}


def _worker(slots: list[LearnerSlot]) -> tuple[LearnerWorker, list[str]]:
    published: list[str] = []

    def publish(slot: LearnerSlot) -> None:
        slot.version += 1
        published.append(slot.name)

    return LearnerWorker(lambda: list(slots), publish, threading.Lock(), CloudTelemetry(0.0)), published


def _item(slot: LearnerSlot, n: int, episode: int = 0) -> QueuedUpload:
    return QueuedUpload(slot, "e", episode, torch.zeros(n, 3, 8, 8), np.zeros(0, np.int64))


def test_worker_feeds_steps_round_robin_and_drops_past_episodes() -> None:
    a, b = LearnerSlot("a", _Learner()), LearnerSlot("b", _Learner())
    b.episode = 1  # a Reset moved b on: its upload of episode 0 still queued is stale
    worker, published = _worker([a, b])
    worker.enqueue(_item(a, 4))
    worker.enqueue(_item(b, 2, episode=0))
    worker.enqueue(_item(b, 2, episode=1))
    assert worker.backlog() == 8 and len(worker.pending()) == 3
    worker.start()
    try:
        assert worker.wait_idle(20.0)
        assert a.learner.added == 4 and b.learner.added == 2  # the stale samples never reached b
        assert published == ["a", "b", "a"]  # one step each per pass: b does not wait for a's backlog
        assert (a.steps, a.version, b.steps, b.version) == (2, 2, 1, 1)
        assert worker.backlog() == 0
    finally:
        worker.begin_stop()
        worker.join()


def test_worker_stop_keeps_the_queue_and_releases_its_waiters() -> None:
    a = LearnerSlot("a", _Learner())
    worker, _ = _worker([a])
    item = _item(a, 2)
    worker.enqueue(item)
    worker.begin_stop()
    worker.start()
    worker.join()
    assert item.done.is_set()  # a lockstep upload waiting on it is answered
    assert worker.stopping and worker.pending() == [item] and a.learner.added == 0  # kept for the last snapshot
    assert not worker.wait_idle(0.1)


def test_telemetry_writes_scalars_and_rates(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    telemetry = CloudTelemetry(rate_interval_s=0.0)
    telemetry.scalar("ignored/before_open", 1.0, 0)  # no writer yet: a no-op, not an error
    telemetry.open(tmp_path / "cloud", {"cloud": {"method": "cema"}})
    telemetry.learner_step("e1", 1, {"student_loss": 0.5, "lr": 0.01}, 12.0, queue=3, replay=8, version=1)
    telemetry.scalar("edge/e1/acc", float("nan"), 1)  # non-finite: skipped
    telemetry.rates(versions=4, uploads=10, samples=40)
    telemetry.close()
    telemetry.scalar("ignored/after_close", 1.0, 0)
    events = EventAccumulator(str(tmp_path / "cloud"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"cloud/e1/loss/student_loss", "cloud/e1/lr", "cloud/e1/step_latency_ms", "cloud/e1/queue",
            "cloud/e1/replay", "cloud/e1/version", "cloud/versions_per_s", "cloud/uploads_per_s",
            "cloud/samples_per_s"} <= tags
    assert not any(t.startswith(("ignored/", "edge/")) for t in tags)
    assert events.Scalars("cloud/e1/queue")[0].value == 3.0
    assert events.Scalars("cloud/samples_per_s")[0].value > 0
    assert (tmp_path / "cloud" / "config.json").read_text().count("cema") == 1


def test_durability_journals_snapshots_and_is_a_no_op_without_a_folder(tmp_path) -> None:
    import time

    from server.checkpoint import Kind, journal_generations, read_journal, read_snapshot
    from server.durability import Durability

    off = Durability(None)
    off.record(Kind.RESET, {"edge_id": "e", "episode": 1})  # nothing written, no error
    assert not off.enabled and off.snapshot(lambda final: {}) is None

    captured: list[bool] = []

    def capture(final: bool) -> dict:
        captured.append(final)
        return {"edges": [], "slots": {}, "final": final}

    on = Durability(tmp_path, every_s=0.05)
    on.open(0)
    with on.lock:
        on.record(Kind.RESET, {"edge_id": "e", "episode": 1})
        on.record_upload(_request(2, auth_token="secret"))
    assert [k for k, _ in read_journal(tmp_path, 0)] == [Kind.RESET, Kind.UPLOAD]
    assert b"secret" not in b"".join(p for _, p in read_journal(tmp_path, 0))  # tokens never reach the disk
    on.start_periodic(capture)
    deadline = time.monotonic() + 20
    while on.checkpoints < 1 and time.monotonic() < deadline:  # something changed: a periodic snapshot follows
        time.sleep(0.02)
    time.sleep(0.3)
    assert captured == [False]  # and only one: nothing changed since
    assert journal_generations(tmp_path) == [1]  # the covered journal is gone, a new one is open
    on.close(capture)
    assert captured == [False, True] and on.checkpoints == 2 and not on.enabled
    assert read_snapshot(tmp_path)["final"] is True


def test_registry_admits_by_the_rules_counts_once_and_round_trips() -> None:
    from server.edges import EdgeRecord
    from server.registry import EdgeRegistry

    slot = LearnerSlot("shared", _Learner())
    reg = EdgeRegistry(max_edges=1)
    edge = EdgeRecord("e1", "m", "sha", slot)
    reg.add(edge)
    assert reg.is_full_for("e2") and not reg.is_full_for("e1") and len(reg) == 1
    assert reg.admit(edge, 0, episode=0) == ("accepted", 0)
    assert reg.record(edge, "accepted", 0, seen=10, samples=4)  # queued for the learner
    assert reg.admit(edge, 0, episode=0) == ("duplicate", 0) and reg.check_duplicate(edge, 0)
    assert reg.admit(edge, 1, episode=1) == ("future", 0)  # Reset first
    reg.set_episode(edge, 2)
    assert reg.admit(edge, 1, episode=1) == ("stale", 2)
    assert not reg.record(edge, "stale", 1, seen=20, samples=3)  # recorded, not learned from
    assert reg.check_duplicate(edge, 1)  # so a retry is a duplicate
    reg.count_publication()
    edges, totals = reg.stats()
    assert totals == {"versions_published": 1, "uploads": 1, "samples": 4}
    e = edges["e1"]
    assert (e.uploads, e.samples, e.stale_samples, e.duplicates, e.seen, e.episode) == (1, 4, 3, 2, 20, 2)
    assert reg.next_sequence(edge) == 2
    assert not reg.record(edge, "duplicate", 0, seen=0, samples=4)  # a raced retry: counted, not queued
    assert not reg.record(edge, "future", 7, seen=0, samples=4)  # refused: nothing recorded
    assert reg.record(edge, "accepted", 5, seen=30, samples=1)  # a gap: 2..4 not seen yet
    assert reg.admit(edge, 3, episode=2) == ("accepted", 2) and reg.admit(edge, 5, episode=2)[0] == "duplicate"
    assert reg.next_sequence(edge) == 6
    assert reg.report_metrics(edge, {"acc": 0.5}) == {"acc": 0.5}
    with pytest.raises(ValueError, match="finite"):
        reg.report_metrics(edge, {"acc": float("nan")})
    again = EdgeRegistry(max_edges=1)
    again.add(EdgeRecord("old", "m", "sha", slot))
    again.load(reg.state(), {"shared": slot})  # replaces, never merges
    assert again.stats() == reg.stats() and again.get("old") is None
    back = again.require("e1")
    assert again.next_sequence(back) == 6 and again.admit(back, 5, episode=2)[0] == "duplicate"  # the gap survived
    assert again.admit(back, 3, episode=2)[0] == "accepted"
    with pytest.raises(KeyError, match="not registered"):
        again.require("e9")
