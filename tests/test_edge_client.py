"""Edge client against an in-test fake cloud: retries re-send the same sequence, subscriber applies."""

import threading
import time

import grpc
import numpy as np
import pytest
from _edge_fake import FakeCloud, perturbed, serve

from edge.client import CloudClient, RetriesExhausted, RetryPolicy, file_sha256
from edge.runtime import EdgeRuntime

FAST = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05, max_total_s=5.0)


@pytest.fixture()
def client(cloud):
    c = CloudClient(cloud[1], "edge-a", timeout=5.0, retry=FAST, seed=0)
    try:
        yield c
    finally:
        c.close()


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_register_sends_model_identity(cloud, client, model_path) -> None:
    fake, _ = cloud
    runtime = EdgeRuntime(model_path)
    reply = client.register(runtime)
    assert reply.next_sequence == 1 and client.max_message_bytes == 64 * 1024 * 1024
    req = fake.registered[0]
    assert req.edge_id == "edge-a" and req.model_id == "edge_cnn_tiny"
    assert req.model_sha256 == file_sha256(model_path) and len(req.model_sha256) == 64
    assert list(req.norm_names) == list(runtime.norm_names)


@pytest.mark.parametrize("record_then_fail", [False, True], ids=["lost-request", "lost-reply"])
def test_transient_failures_resend_the_same_sequence_counted_once(cloud, client, record_then_fail) -> None:
    fake, _ = cloud
    fake.fail_uploads, fake.record_then_fail = 2, record_then_fail
    res = client.upload(_images(), np.array([0.1, 0.2, 0.3]), 7, labels=np.array([1, 2, 3]), episode=1)
    assert fake.upload_attempts == [7, 7, 7] and res.attempts == 3
    assert fake.accepted == {("edge-a", 7): 3}  # queued once
    assert res.reply.duplicate == record_then_fail  # the cloud had it already: acknowledged, not re-queued
    assert res.request_bytes == fake.request_bytes[("edge-a", 7)] > 3 * 8 * 8 * 3
    assert fake.labels_seen == 3 and fake.episodes_seen == [1]


@pytest.mark.parametrize("code", [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_other_transient_codes_are_retried(cloud, client, code) -> None:
    fake, _ = cloud
    fake.fail_uploads, fake.fail_code = 1, code
    assert client.upload(_images(1), [0.5], 3).attempts == 2


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED])
def test_permanent_errors_are_not_retried(cloud, client, code) -> None:
    fake, _ = cloud
    fake.fail_uploads, fake.fail_code = 3, code
    with pytest.raises(grpc.RpcError) as info:
        client.upload(_images(1), [0.5], 1)
    assert info.value.code() == code and fake.upload_attempts == [1]


def test_bad_token_is_unauthenticated_at_once(cloud, client) -> None:
    fake, _ = cloud
    fake.token = "secret"
    with pytest.raises(grpc.RpcError) as info:
        client.upload(_images(1), [0.5], 1)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_retries_are_bounded_in_attempts_and_time(cloud) -> None:
    fake, address = cloud
    fake.fail_uploads = 100
    sleeps: list[float] = []
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, multiplier=2.0, jitter=0.0, max_total_s=5.0)
    with CloudClient(address, "edge-b", retry=policy, sleep=sleeps.append) as c:
        with pytest.raises(RetriesExhausted, match="4 attempts, last status UNAVAILABLE") as info:
            c.upload(_images(1), [0.5], 9)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and fake.upload_attempts == [9] * 4
    assert sleeps == pytest.approx([0.01, 0.02, 0.04])  # exponential backoff
    fake.upload_attempts.clear()
    slow = RetryPolicy(max_attempts=50, initial_backoff_s=0.05, jitter=0.0, max_total_s=0.2)
    with CloudClient(address, "edge-b", retry=slow) as c:
        t0 = time.monotonic()
        with pytest.raises(RetriesExhausted):
            c.upload(_images(1), [0.5], 10)
        assert time.monotonic() - t0 < 1.0 and len(fake.upload_attempts) < 50


def test_unreachable_cloud_gives_up(model_path) -> None:
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_total_s=1.0)
    with CloudClient("127.0.0.1:1", "edge-c", timeout=0.5, connect_timeout=0.3, retry=policy) as c:
        with pytest.raises(RetriesExhausted, match="register"):
            c.register(EdgeRuntime(model_path))


def test_register_waits_for_a_cloud_that_starts_late(model_path) -> None:
    import socket

    with socket.socket() as s:  # a free port nobody listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = FakeCloud()
    result = {}
    with CloudClient(f"127.0.0.1:{port}", "edge-late", connect_timeout=10, retry=FAST) as c:
        t = threading.Thread(target=lambda: result.update(reply=c.register(EdgeRuntime(model_path))))
        t.start()
        time.sleep(0.3)
        try:
            with serve(fake, port=port):
                t.join(10)
        finally:
            t.join()
    assert result["reply"].next_sequence == 1 and len(fake.registered) == 1


def test_jitter_stays_within_bounds() -> None:
    import random

    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=4.0, jitter=0.2)
    rng = random.Random(0)
    for retry, base in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 4.0)]:
        d = [policy.delay(retry, rng) for _ in range(50)]
        assert base * 0.8 <= min(d) and max(d) <= base * 1.2 and len(set(d)) > 1


def test_bad_uploads_are_refused_before_sending(client) -> None:
    with pytest.raises(ValueError, match="uint8"):
        client.upload(np.zeros((1, 8, 8, 3), np.float32), [0.1], 1)
    with pytest.raises(ValueError, match="entropies"):
        client.upload(_images(2), [0.1], 1)


def test_subscriber_applies_newer_versions_and_ignores_stale_and_old_episodes(cloud, client, model_path) -> None:
    fake, _ = cloud
    runtime = EdgeRuntime(model_path)
    initial = runtime.norm_state()
    sub = client.subscribe(runtime, episode=1)
    try:
        fake.wait_subscribers(1)
        s1 = perturbed(initial, 1)
        sizes = [fake.publish(s1, version=1, episode=1).ByteSize()]
        assert sub.wait_for_version(1, timeout=5)
        for k in initial:
            np.testing.assert_array_equal(runtime.norm_state()[k], s1[k])
        sizes.append(fake.publish(perturbed(initial, 2), version=1, episode=1).ByteSize())  # not newer
        sizes.append(fake.publish(perturbed(initial, 3), version=5, episode=0).ByteSize())  # older episode
        s2 = perturbed(initial, 4)
        sizes.append(fake.publish(s2, version=2, episode=2).ByteSize())
        assert sub.wait_for_version(2, timeout=5)
        deadline = time.monotonic() + 5
        while sub.stats().updates_received < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = sub.stats()
        assert runtime.version == 2
        assert (stats.versions_applied, stats.stale_ignored, stats.episode_ignored) == (2, 1, 1)
        assert stats.bytes_down == sum(sizes)  # every update received counts, applied or not
        assert stats.update_latency_s.count == 2 and stats.update_latency_s.mean >= 0
        np.testing.assert_array_equal(runtime.norm_state()[runtime.norm_names[0]], s2[runtime.norm_names[0]])
        # a malformed update is refused and counted, the thread survives
        bad = {runtime.norm_names[0]: np.zeros(3, np.float32)}
        fake.publish(bad, version=3, episode=2)
        fake.publish(perturbed(initial, 5), version=4, episode=2)
        assert sub.wait_for_version(4, timeout=5) and sub.stats().apply_errors == 1
    finally:
        sub.close()
    assert not sub.is_alive()


def test_subscriber_reconnects_after_server_restart_and_resumes_after_version(model_path) -> None:
    runtime = EdgeRuntime(model_path)
    initial = runtime.norm_state()
    fake, fake2 = FakeCloud(), FakeCloud()
    c = None
    sub = None
    try:
        with serve(fake) as address:
            c = CloudClient(address, "edge-r", retry=FAST)
            sub = c.subscribe(runtime)
            fake.wait_subscribers(1)
            fake.publish(perturbed(initial, 1), version=3)
            assert sub.wait_for_version(3, timeout=5)
        # the cloud went away (stream broken); a new one comes up on the same port
        port = int(address.rsplit(":", 1)[1])
        with serve(fake2, port=port):
            fake2.wait_subscribers(1, timeout=10)
            assert fake2.subscribe_requests[-1].after_version == 3  # resumes after the version in force
            fake2.publish(perturbed(initial, 2), version=4)
            assert sub.wait_for_version(4, timeout=5)
            assert sub.stats().reconnects >= 1
    finally:
        if sub is not None:
            sub.close()
        if c is not None:
            c.close()
    assert not sub.is_alive()


def test_subscriber_stops_on_unauthenticated(cloud, model_path) -> None:
    fake, address = cloud
    fake.token = "secret"
    with CloudClient(address, "edge-x", token="wrong", retry=FAST) as c:
        sub = c.subscribe(EdgeRuntime(model_path))
        sub.join(5)
        assert not sub.is_alive() and "UNAUTHENTICATED" in str(sub.error)
        sub.close()


def test_reset_and_metrics(cloud, client) -> None:
    fake, _ = cloud
    reply = client.reset(1)
    assert (reply.version, reply.episode) == (1, 1) and fake.resets == [("edge-a", 1)]
    client.report_metrics(3, {"seen": 10, "accuracy": 0.5})
    assert fake.metrics[0].step == 3 and dict(fake.metrics[0].values) == {"seen": 10.0, "accuracy": 0.5}
