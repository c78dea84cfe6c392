"""The edge's offline upload buffer (edge/uploader.py): outages, the bound, refusals, restarts.

Node-level tests run a real gRPC fake cloud (tests/_edge_fake.py) whose uploads fail on demand;
unit tests drive :class:`edge.uploader.Uploader` with a scripted client. No test asserts timing:
where an order matters the source waits for the event it needs (e.g. the sender has started).
"""

import logging
import threading
import time

import grpc
import numpy as np
import pytest
from _edge_fake import FakeCloud, perturbed

from edge.client import CloudClient, RetriesExhausted, RetryPolicy, UploadResult
from edge.config import NodeConfig
from edge.node import EdgeNode
from edge.runtime import EdgeRuntime
from edge.selection import EntropySelector, SelectionConfig
from edge.sources import NpzSource, save_stream_npz
from edge.uploader import Outcome, Uploader, UploaderConfig
from protos.fedshift.v1 import edge_pb2 as pb

# two attempts per round of the client's retries, so an outage of K failed attempts outlasts it
SHORT = RetryPolicy(max_attempts=2, initial_backoff_s=0.005, max_backoff_s=0.02, max_total_s=2.0)
FAST = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05, max_total_s=5.0)


@pytest.fixture(scope="module")
def reset_stream(tmp_path_factory):
    """33 labelled samples, two corruptions, reset protocol: batches of 8 are 8, 8, 4 | 8, 5."""
    rng = np.random.default_rng(0)
    segs = [(name, 5, rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, n))
            for name, n in (("gaussian_noise", 20), ("fog", 13))]
    return save_stream_npz(tmp_path_factory.mktemp("stream") / "r.npz", segs, "reset")


@pytest.fixture(scope="module")
def continual_stream(tmp_path_factory):
    """40 samples of one corruption, continual: five batches of 8 (only the first one resets)."""
    rng = np.random.default_rng(1)
    segs = [("fog", 3, rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 40))]
    return save_stream_npz(tmp_path_factory.mktemp("stream") / "c.npz", segs, "continual")


def _node(runtime, source, client, **kw) -> EdgeNode:
    sel = EntropySelector(SelectionConfig(num_classes=runtime.num_classes, method="all"))
    return EdgeNode(runtime, source, client, sel, config=NodeConfig(**kw))


def _sequences(fake: FakeCloud) -> list[int]:
    """Sequences in the order the cloud accepted them (each once: the fake dedups)."""
    return [seq for _, seq in fake.accepted]


class _Hooked:
    """Yields the inner source's batches; ``hooks[i]()`` runs after batch i was processed (before the
    next is read), ``hooks[-1]()`` after the last one."""

    def __init__(self, inner, hooks: dict) -> None:
        self.inner, self.hooks = inner, hooks

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            yield batch
            self.hooks.get(i, lambda: None)()
        self.hooks.get(-1, lambda: None)()


def _wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


# -------------------------------------------------------------------------------- the node


def test_an_outage_is_buffered_and_every_upload_sent_oldest_first_once(cloud, model_path, reset_stream,
                                                                       caplog) -> None:
    """The cloud refuses 9 attempts in a row (4 rounds of the client's 2-attempt policy and one
    more): the edge predicts every batch meanwhile, and then every queued upload is acknowledged
    in sequence order, each once; one line when the outage starts, one when it ends."""
    fake, address = cloud
    fake.fail_uploads = 9
    caplog.set_level(logging.INFO, logger="edge")
    with CloudClient(address, "edge-o", retry=SHORT) as client:
        summary = _node(EdgeRuntime(model_path), NpzSource(reset_stream, 8), client).run()
    assert summary.seen == 33 and summary.batches == 5  # every batch predicted
    assert summary.uploaded == summary.kept == 33 and summary.uploads == 5
    assert summary.upload_failed == summary.upload_dropped == summary.upload_unsent == summary.upload_pending == 0
    assert _sequences(fake) == [1, 2, 3, 4, 5] and summary.duplicates == 0
    assert fake.upload_attempts == sorted(fake.upload_attempts)  # the head is retried, never overtaken
    assert fake.upload_attempts.count(1) == 10 and summary.upload_retries == 9
    assert summary.upload_outages == 1
    assert fake.episodes_seen == [1, 1, 1, 2, 2]  # the reset waited for episode 1's uploads
    lines = [r.getMessage() for r in caplog.records if r.name == "edge.uploader"]
    assert sum("unreachable" in m for m in lines) == 1 and sum("reachable again" in m for m in lines) == 1
    assert [s.uploaded for s in summary.per_shift.values()] == [20, 13]
    assert list(summary.timeline.uploaded) == [8, 8, 4, 8, 5]  # acks attributed back to their batch


@pytest.mark.parametrize("comes_back", [True, False], ids=["cloud-back-at-the-end", "cloud-down-throughout"])
def test_the_bound_drops_the_oldest_uploads_and_counts_them(cloud, model_path, continual_stream,
                                                            comes_back) -> None:
    """Bound 20 samples, five uploads of 8, the cloud down while they are made. Upload 1 is being
    sent (never dropped: it may have reached the cloud); upload 2 fits (16); 3, 4 and 5 each push the
    buffer to 24 and drop the oldest not yet sent: 2, 3, 4. So 24 samples in 3 requests are dropped
    and 1 and 5 stay. If the cloud comes back, the end flush delivers those two; if not, they are
    counted as unsent when the flush times out."""
    fake, address = cloud
    fake.fail_uploads = 10**6

    def cloud_back() -> None:
        if comes_back:
            with fake.lock:
                fake.fail_uploads = 0

    hooks = {0: lambda: _wait_until(lambda: len(fake.upload_attempts) > 0), -1: cloud_back}
    with CloudClient(address, "edge-b", retry=SHORT) as client:
        node = _node(EdgeRuntime(model_path), _Hooked(NpzSource(continual_stream, 8), hooks), client,
                     max_buffered_samples=20, flush_timeout_s=10.0 if comes_back else 0.2)
        summary = node.run()
    assert summary.seen == summary.kept == 40
    assert summary.upload_dropped == 24 and summary.uploads_dropped == 3
    if comes_back:
        assert _sequences(fake) == [1, 5] and summary.uploaded == 16 and summary.upload_unsent == 0
        assert list(summary.timeline.uploaded) == [8, 0, 0, 0, 8]
    else:
        assert set(fake.upload_attempts) == {1} and summary.uploaded == 0 and summary.upload_unsent == 16
    assert summary.uploaded + summary.upload_failed + summary.upload_dropped + summary.upload_unsent == summary.kept
    assert summary.upload_pending == 0 and summary.upload_failed == 0


def test_a_refused_upload_is_dropped_alone(cloud, model_path, reset_stream) -> None:
    fake, address = cloud
    fake.fail_uploads, fake.fail_code = 1, grpc.StatusCode.INVALID_ARGUMENT
    with CloudClient(address, "edge-x", retry=FAST) as client:
        summary = _node(EdgeRuntime(model_path), NpzSource(reset_stream, 8), client).run()
    assert summary.upload_failed == 8 and summary.upload_errors == 1 and summary.upload_retries == 0
    assert summary.uploaded == 25 and _sequences(fake) == [2, 3, 4, 5] and fake.upload_attempts == [1, 2, 3, 4, 5]
    assert summary.uploaded + summary.upload_failed == summary.kept
    assert list(summary.timeline.uploaded) == [0, 8, 4, 8, 5]


def test_not_registered_mid_stream_registers_again_once_and_resends_the_same_sequence(cloud, model_path,
                                                                                     reset_stream) -> None:
    """The cloud forgets the edge once uploads 1 and 2 are acknowledged: upload 3 is refused "not
    registered", the sender has the node register again (bringing the cloud back to episode 1),
    and sends upload 3 again under sequence 3; the reset that follows goes after it."""
    fake, address = cloud

    def forget() -> None:
        _wait_until(lambda: len(fake.accepted) == 2)
        fake.forget()

    with CloudClient(address, "edge-r", retry=FAST) as client:
        summary = _node(EdgeRuntime(model_path), _Hooked(NpzSource(reset_stream, 8), {1: forget}), client).run()
    assert summary.reregistrations == 1 and len(fake.registered) == 2
    assert fake.unregistered_uploads == [3] and _sequences(fake) == [1, 2, 3, 4, 5]
    assert summary.uploaded == summary.kept == 33 and summary.duplicates == 0
    assert fake.resets == [("edge-r", 1), ("edge-r", 1), ("edge-r", 2)]


def test_lockstep_waits_for_each_ack_through_an_outage(cloud, model_path, reset_stream) -> None:
    """Lockstep: the first upload outlasts two rounds of the client's retries; the node waits for
    it (it is not dropped) and batch 2 is still predicted with the cloud's step on batch 1."""
    fake, address = cloud
    runtime = EdgeRuntime(model_path)
    fake.step_on_upload = perturbed(runtime.norm_state(), 3)
    fake.fail_uploads = 4
    with CloudClient(address, "edge-s", retry=SHORT) as client:
        summary = _node(runtime, NpzSource(reset_stream, 8), client, limit=20, sync_timeout_s=5.0).run()
    assert list(summary.timeline.version) == [1, 2, 3]
    assert summary.sync_waits == 3 and summary.sync_timeouts == 0
    assert summary.uploaded == summary.kept == 20 and summary.upload_outages == 1


def test_a_fatal_upload_error_ends_the_run_at_the_next_step(cloud, model_path, reset_stream) -> None:
    fake, address = cloud
    fake.fail_uploads, fake.fail_code = 1, grpc.StatusCode.PERMISSION_DENIED
    ref: dict[str, EdgeNode] = {}
    hooks = {0: lambda: _wait_until(lambda: ref["node"].summary(timeline=False).upload_failed == 8)}
    with CloudClient(address, "edge-f", retry=FAST) as client:
        node = ref["node"] = _node(EdgeRuntime(model_path), _Hooked(NpzSource(reset_stream, 8), hooks), client)
        with pytest.raises(grpc.RpcError) as info:
            node.run()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    summary = node.summary()  # the CLI writes this one, with error set
    assert summary.seen == 8 and summary.upload_failed == 8 and summary.uploaded == 0


# -------------------------------------------------------------------------------- the uploader alone


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _ScriptedClient:
    """``script``: what each upload call does in turn (an exception to raise, or None: acknowledge);
    then every call is acknowledged. ``gate`` (if set) holds every call until it is set."""

    def __init__(self, script=(), gate: threading.Event | None = None) -> None:
        self.script, self.gate = list(script), gate
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def upload(self, images, entropies, sequence, **kw) -> UploadResult:
        with self.lock:
            self.calls.append(sequence)
            step = self.script.pop(0) if self.script else None
        if self.gate is not None:
            self.gate.wait(10)
        if step is not None:
            raise step
        return UploadResult(pb.UploadReply(sequence=sequence, accepted=len(images), latest_version=sequence), 10, 1)


def _images(n: int) -> np.ndarray:
    return np.zeros((n, 2, 2, 3), np.uint8)


def _put(up: Uploader, seq: int, n: int, tag: int = 0):
    return up.put(seq, _images(n), np.zeros(n, np.float32), tag=tag)


def _config(bound: int = 100) -> UploaderConfig:
    return UploaderConfig(bound, backoff=RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.005))


def test_uploader_sorts_out_each_kind_of_failure() -> None:
    """Transient (raw UNAVAILABLE, RetriesExhausted) → retried; ValueError and INVALID_ARGUMENT →
    that upload failed; "not registered" → the callback, then the same upload again."""
    registered = []
    client = _ScriptedClient([_Status(grpc.StatusCode.UNAVAILABLE),
                              RetriesExhausted("upload #1", grpc.StatusCode.UNAVAILABLE, 3, "down"),
                              None,  # 1 acked after 1 + 3 failed attempts
                              ValueError("over the server's limit"),  # 2 refused before sending
                              _Status(grpc.StatusCode.FAILED_PRECONDITION, "edge 'e' is not registered"),
                              None,  # 3 acked after registering again
                              _Status(grpc.StatusCode.INVALID_ARGUMENT, "bad images")])  # 4 refused
    up = Uploader(client, _config(), on_not_registered=lambda: registered.append(1)).start()
    try:
        items = [_put(up, seq, seq, tag=seq) for seq in (1, 2, 3, 4, 5)]
        assert up.flush(10)
        assert [up.wait(i, 0) for i in items] == [Outcome.ACKED, Outcome.FAILED, Outcome.ACKED, Outcome.FAILED,
                                                  Outcome.ACKED]
    finally:
        up.close()
    s = up.stats()
    assert client.calls == [1, 1, 1, 2, 3, 3, 4, 5] and registered == [1]
    assert (s.uploaded, s.uploads, s.upload_failed, s.upload_errors) == (1 + 3 + 5, 3, 2 + 4, 2)
    assert s.upload_retries == 4 and s.upload_outages == 1 and s.cloud_version == 5
    assert dict(s.acked_by_tag) == {1: 1, 3: 3, 5: 5} and s.upload_pending == s.upload_unsent == 0


def test_uploader_bound_spares_the_upload_being_sent_and_an_oversized_newcomer() -> None:
    gate = threading.Event()
    client = _ScriptedClient(gate=gate)
    up = Uploader(client, _config(bound=10)).start()
    try:
        first = _put(up, 1, 6)
        _wait_until(lambda: client.calls == [1])  # being sent
        second = _put(up, 2, 4)  # 10: fits
        third = _put(up, 3, 12)  # alone over the bound: kept; only 2 can go (1 is being sent)
        assert up.wait(second, 0) is Outcome.DROPPED and up.wait(third, 0) is None
        s = up.stats()
        assert (s.upload_dropped, s.uploads_dropped, s.upload_pending, s.uploads_pending) == (4, 1, 18, 2)
        gate.set()
        assert up.flush(10) and up.wait(first, 0) is up.wait(third, 0) is Outcome.ACKED
    finally:
        gate.set()
        up.close()
    assert client.calls == [1, 3] and up.stats().uploaded == 18


def test_uploader_close_counts_what_is_left_as_unsent() -> None:
    client = _ScriptedClient([RetriesExhausted("upload", grpc.StatusCode.UNAVAILABLE, 1, "down")] * 1000)
    up = Uploader(client, _config()).start()
    items = [_put(up, seq, 3) for seq in (1, 2)]
    assert not up.flush(0.05)
    up.close()
    assert [up.wait(i, 0) for i in items] == [Outcome.UNSENT, Outcome.UNSENT]
    s = up.stats()
    assert s.upload_unsent == 6 and s.upload_pending == 0 and s.uploaded == 0
    with pytest.raises(RuntimeError, match="closed"):
        _put(up, 3, 1)
