"""The CEMA cloud gRPC service on loopback: validation, auth, idempotency, versions, parity, reset,
TensorBoard and a clean shutdown. Tiny models (16 px, width 8) keep it fast."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from core.cema import CemaConfig
from core.export import Preprocess, export_onnx
from core.models import create_model
from core.norm import get_norm_state, set_norm_state
from core.training import to_tensor
from edge.runtime import EdgeRuntime
from protos.codec import GRPC_OPTIONS, decode_state, encode_array
from protos.contract import file_sha256
from protos.fedshift.v1 import edge_pb2 as pb
from protos.fedshift.v1 import edge_pb2_grpc as pb_grpc
from server.cloud import CloudConfig, CloudServer

from _cloud_run import RunningCloud

SIZE = 16
TOKEN = "s3cret"


def _trained_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BN running statistics, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, SIZE, SIZE, generator=g) * 1.5 + 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = _trained_like(create_model("edge_cnn", 10, image_size=SIZE, width=8), 1)
    teacher = _trained_like(create_model("teacher_resnet", 10, image_size=SIZE, width=8, blocks=1), 2)
    return student, teacher


def _config(tmp_path: Path | None = None, **kw) -> CloudConfig:
    cema = kw.pop("cema", CemaConfig(batch_size=4, replay_start=8))
    kw.setdefault("insecure", not kw.get("tls_cert"))  # loopback tests; TLS has its own tests
    return CloudConfig(image_size=SIZE, cema=cema, rate_interval_s=0.0,
                       out_dir=str(tmp_path) if tmp_path else "", **kw)


def _images(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _upload(stub, seq: int, images: np.ndarray, edge: str = "e1", **kw) -> pb.UploadReply:
    kw.setdefault("entropies", [0.5] * len(images))
    return stub.Upload(pb.UploadRequest(edge_id=edge, sequence=seq, images=encode_array(images), **kw), timeout=10)


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def test_malformed_uploads_are_refused_and_server_keeps_serving(models) -> None:
    with RunningCloud(models, _config()) as run:
        stub = run.stub
        stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10)
        bad = [
            (pb.UploadRequest(edge_id="e1", sequence=0, images=pb.Tensor(shape=[2, SIZE, SIZE, 3], dtype=pb.UINT8,
                                                                          data=b"\x00" * 10)), "bytes"),
            (pb.UploadRequest(edge_id="e1", sequence=0,
                              images=encode_array(np.zeros((2, SIZE, SIZE, 3), np.float32))), "uint8"),
            (pb.UploadRequest(edge_id="e1", sequence=0, images=encode_array(_images(2, size=8))), "takes"),
            (pb.UploadRequest(edge_id="e1", sequence=0, images=encode_array(_images(0))), "empty"),
            (pb.UploadRequest(edge_id="e1", sequence=0, images=encode_array(_images(3)), entropies=[0.1]),
             "entropies"),
            (pb.UploadRequest(edge_id="e1", sequence=0, images=encode_array(_images(3)), labels=[1, 2]), "labels"),
            (pb.UploadRequest(edge_id="e1", sequence=0, images=encode_array(_images(2)), labels=[1, 10]), "labels"),
            (pb.UploadRequest(edge_id="e1", sequence=0), "dtype"),
        ]
        for request, words in bad:
            with pytest.raises(grpc.RpcError) as exc:
                stub.Upload(request, timeout=10)
            assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
            assert words in exc.value.details()
        reply = _upload(stub, 0, _images(3), labels=[1, 2, 3])  # the refused sequence 0 is still free
        assert (reply.accepted, reply.duplicate) == (3, False)
        with pytest.raises(grpc.RpcError) as exc:
            _upload(stub, 1, _images(2), edge="nobody")
        assert _code(exc) == grpc.StatusCode.FAILED_PRECONDITION
        assert run.server.service.stats().edges["e1"].samples == 3


def test_auth_token(models) -> None:
    with RunningCloud(models, _config(token=TOKEN)) as run:
        stub = run.stub
        for token in ("", "wrong"):
            with pytest.raises(grpc.RpcError) as exc:
                stub.Register(pb.RegisterRequest(edge_id="e1", auth_token=token), timeout=10)
            assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Register(pb.RegisterRequest(edge_id="e1", auth_token=TOKEN), timeout=10)
        assert reply.version == 0 and reply.next_sequence == 0
        assert reply.max_message_bytes == run.server.config.max_message_bytes == 1024 * (16 * 16 * 3 + 16) + 65536
        with pytest.raises(grpc.RpcError) as exc:
            _upload(stub, 0, _images(2), auth_token="wrong")
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as exc:
            stub.ReportMetrics(pb.MetricsReport(edge_id="e1", values={"a": 1.0}), timeout=10)
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        assert _upload(stub, 0, _images(2), auth_token=TOKEN).accepted == 2


def test_register_refuses_a_different_model(models) -> None:
    with RunningCloud(models, _config()) as run:
        with pytest.raises(grpc.RpcError) as exc:
            run.stub.Register(pb.RegisterRequest(edge_id="e1", norm_names=["features.1.weight", "x.bias"]), timeout=10)
        assert _code(exc) == grpc.StatusCode.FAILED_PRECONDITION
        names = list(get_norm_state(models[0]))
        assert run.stub.Register(pb.RegisterRequest(edge_id="e1", norm_names=names), timeout=10).version == 0


def test_duplicate_sequence_is_acknowledged_not_requeued(models) -> None:
    with RunningCloud(models, _config()) as run:
        stub, service = run.stub, run.server.service
        stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10)
        assert _upload(stub, 5, _images(4)).accepted == 4
        again = _upload(stub, 5, _images(4, seed=1))
        assert again.duplicate and again.accepted == 0
        assert service.wait_idle(30)
        learner = service.learner("e1")
        assert learner.student_steps == 1 and learner.queue_size == 0 and len(learner.replay) == 4
        stats = service.stats().edges["e1"]
        assert (stats.uploads, stats.samples, stats.duplicates) == (1, 4, 1)
        # a restarted edge resumes after the highest sequence the cloud has seen
        assert stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10).next_sequence == 6


def test_subscriber_receives_increasing_versions(models) -> None:
    with RunningCloud(models, _config()) as run:
        stub = run.stub
        stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10)
        stream = stub.Subscribe(pb.SubscribeRequest(edge_id="e1", after_version=0))
        received: list[pb.ParameterUpdate] = []

        def consume() -> None:
            for update in stream:
                received.append(update)
                if update.version >= 3:
                    return

        reader = threading.Thread(target=consume)
        reader.start()
        for seq in range(3):
            assert _upload(stub, seq, _images(4, seed=seq)).accepted == 4
        reader.join(30)
        stream.cancel()
        versions = [u.version for u in received]
        assert versions and versions[-1] == 3 and versions == sorted(set(versions)), versions
        last = received[-1]
        assert last.cloud_step == 3 and last.episode == 0 and last.created_unix > 0
        assert set(decode_state(last.tensors)) == set(get_norm_state(models[0]))
        # a late subscriber that is behind gets only the newest version
        late = stub.Subscribe(pb.SubscribeRequest(edge_id="e1", after_version=0))
        assert next(late).version == 3
        late.cancel()


def test_published_state_matches_edge_runtime(models, tmp_path: Path) -> None:
    student = models[0]
    path = tmp_path / "edge.onnx"
    export_onnx(student, path, (3, SIZE, SIZE), model_name="edge_cnn")
    runtime = EdgeRuntime(path)
    with RunningCloud(models, _config()) as run:
        stub, service = run.stub, run.server.service
        stub.Register(pb.RegisterRequest(edge_id="e1", norm_names=list(runtime.norm_names)), timeout=10)
        for seq in range(4):
            _upload(stub, seq, _images(6, seed=10 + seq))
        assert service.wait_idle(30)
        stream = stub.Subscribe(pb.SubscribeRequest(edge_id="e1", after_version=runtime.version))
        update = next(stream)
        stream.cancel()
        adapted = copy.deepcopy(service.learner("e1").student).eval()
    state = decode_state(update.tensors)
    assert update.version == 6  # 24 samples, batches of 4
    assert runtime.apply(state, update.version) and runtime.wait_for_version(update.version, 60)  # in force
    images = _images(8, seed=99)
    with torch.no_grad():
        expected = adapted(to_tensor(images)).numpy()
    np.testing.assert_allclose(runtime.predict(images), expected, atol=1e-4)
    # only the normalization state changed: the initial model + the published state is the student
    rebuilt = copy.deepcopy(student)
    set_norm_state(rebuilt, state)
    with torch.no_grad():
        np.testing.assert_allclose(rebuilt.eval()(to_tensor(images)).numpy(), expected, atol=1e-5)
    assert not np.allclose(EdgeRuntime(path).predict(images), expected, atol=1e-4)  # it did adapt


def test_reset_restores_initial_state(models) -> None:
    initial = get_norm_state(models[0])
    with RunningCloud(models, _config()) as run:
        stub, service = run.stub, run.server.service
        stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10)
        for seq in range(3):
            _upload(stub, seq, _images(4, seed=seq))
        assert service.wait_idle(30)
        assert any(not np.array_equal(v, initial[k]) for k, v in service.learner("e1").norm_state().items())
        reply = stub.Reset(pb.ResetRequest(edge_id="e1", episode=1), timeout=10)
        assert (reply.version, reply.episode) == (4, 1)
        for k, v in service.learner("e1").norm_state().items():
            np.testing.assert_array_equal(v, initial[k])
        stream = stub.Subscribe(pb.SubscribeRequest(edge_id="e1", after_version=3))
        update = next(stream)
        stream.cancel()
        assert (update.version, update.episode) == (4, 1)
        for k, v in decode_state(update.tensors).items():
            np.testing.assert_array_equal(v, initial[k])
        # a retried Reset changes nothing; going back is refused
        assert stub.Reset(pb.ResetRequest(edge_id="e1", episode=1), timeout=10).version == 4
        with pytest.raises(grpc.RpcError) as exc:
            stub.Reset(pb.ResetRequest(edge_id="e1", episode=0), timeout=10)
        assert _code(exc) == grpc.StatusCode.FAILED_PRECONDITION
        # samples of the past episode are acknowledged but not learned from; future ones are refused
        stale = _upload(stub, 10, _images(4), episode=0)
        assert (stale.accepted, stale.duplicate) == (0, False)
        with pytest.raises(grpc.RpcError) as exc:
            _upload(stub, 11, _images(4), episode=2)
        assert _code(exc) == grpc.StatusCode.FAILED_PRECONDITION
        assert _upload(stub, 12, _images(4), episode=1).accepted == 4
        assert service.wait_idle(30)
        assert service.learner("e1").student_steps == 1
        assert service.stats().edges["e1"].stale_samples == 4


def test_shared_student_serves_all_edges(models) -> None:
    with RunningCloud(models, _config(shared=True)) as run:
        stub, service = run.stub, run.server.service
        for edge in ("a", "b"):
            stub.Register(pb.RegisterRequest(edge_id=edge), timeout=10)
        _upload(stub, 0, _images(2), edge="a")
        _upload(stub, 0, _images(2, seed=1), edge="b")  # together one batch of 4
        assert service.wait_idle(30)
        assert service.learner("a") is service.learner("b") and service.learner("a").student_steps == 1
        assert stub.Register(pb.RegisterRequest(edge_id="b"), timeout=10).version == 1
        # the first edge entering episode 1 resets the shared student, the second one just joins
        assert stub.Reset(pb.ResetRequest(edge_id="a", episode=1), timeout=10).version == 2
        assert stub.Reset(pb.ResetRequest(edge_id="b", episode=1), timeout=10).version == 2


def test_subscriptions_hold_no_thread_and_every_one_gets_the_update(models) -> None:
    """200 open Subscribe streams on a cloud with 2 RPC threads: the process gains no thread per
    stream, and one publication reaches all of them."""
    with RunningCloud(models, _config(shared=True, max_workers=2)) as run:
        stub = run.stub
        for i in range(200):
            stub.Register(pb.RegisterRequest(edge_id=f"e{i}"), timeout=10)
        before = threading.active_count()
        streams = [stub.Subscribe(pb.SubscribeRequest(edge_id=f"e{i}")) for i in range(200)]
        _upload(stub, 0, _images(4), edge="e0")  # one cloud step of the shared student: version 1
        first = [next(call).version for call in streams]
        during = threading.active_count()  # 200 streams open, each waiting for a newer version
        _upload(stub, 1, _images(4, seed=1), edge="e0")
        second = [next(call).version for call in streams]  # one publication fans out to all
        for call in streams:
            call.cancel()
    assert first == [1] * 200 and second == [2] * 200
    assert during - before < 10, f"{during - before} threads more with 200 open subscriptions"


def test_upload_size_is_bounded_by_the_configuration(models) -> None:
    """max_upload_samples bounds one upload, and with the image shape the largest message gRPC
    reads at all: more is refused before it is held in memory, and the cloud keeps serving."""
    with RunningCloud(models, _config(max_upload_samples=8)) as run:
        stub = run.stub
        assert stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10).max_message_bytes == 8 * 784 + 65536
        with pytest.raises(grpc.RpcError) as exc:
            _upload(stub, 0, _images(9))
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT and "at most 8" in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            _upload(stub, 1, _images(200))  # 150 KB: over the message bound, refused by gRPC unread
        assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _upload(stub, 2, _images(8)).accepted == 8


def test_a_sequence_number_out_of_range_is_refused(models) -> None:
    """2^64 - 1 once broke the edge's next Register (the next sequence no longer fits uint64)."""
    with RunningCloud(models, _config()) as run:
        stub = run.stub
        stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10)
        for seq in (2**63, 2**64 - 1):
            with pytest.raises(grpc.RpcError) as exc:
                _upload(stub, seq, _images(2))
            assert _code(exc) == grpc.StatusCode.OUT_OF_RANGE
        assert _upload(stub, 2**63 - 1, _images(2)).accepted == 2
        assert stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10).next_sequence == 2**63


def test_metric_names_are_bounded(models) -> None:
    """An edge cannot grow the cloud's memory (or its TensorBoard tags) with endless metric names."""
    with RunningCloud(models, _config()) as run:
        stub = run.stub
        stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10)
        stub.ReportMetrics(pb.MetricsReport(edge_id="e1", values={f"m{i}": 1.0 for i in range(64)}), timeout=10)
        with pytest.raises(grpc.RpcError) as exc:
            stub.ReportMetrics(pb.MetricsReport(edge_id="e1", values={"one_more": 1.0}), timeout=10)
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT and "at most 64" in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            stub.ReportMetrics(pb.MetricsReport(edge_id="e1", values={"x" * 65: 1.0}), timeout=10)
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
        stub.ReportMetrics(pb.MetricsReport(edge_id="e1", values={"m0": 2.0}), timeout=10)  # known names: fine
        assert run.server.service.stats().edges["e1"].metrics["m0"] == 2.0


def test_metrics_tensorboard_and_clean_shutdown(models, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    before = set(threading.enumerate())
    server = CloudServer(models[0], models[1], _config(tmp_path), preprocess=Preprocess())
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=GRPC_OPTIONS)
    stub = pb_grpc.EdgeServiceStub(channel)
    stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10)
    stream = stub.Subscribe(pb.SubscribeRequest(edge_id="e1"))
    outcome: dict[str, object] = {}

    def consume() -> None:
        try:
            outcome["versions"] = [u.version for u in stream]
        except grpc.RpcError as exc:  # pragma: no cover - reported by the assertion below
            outcome["error"] = exc.code()

    reader = threading.Thread(target=consume)
    reader.start()
    for seq in range(2):
        _upload(stub, seq, _images(4, seed=seq))
    stub.ReportMetrics(pb.MetricsReport(edge_id="e1", step=7, values={"accuracy": 0.5, "uploaded": 8}), timeout=10)
    assert server.service.wait_idle(30)
    assert server.service.stats().edges["e1"].metrics == {"accuracy": 0.5, "uploaded": 8.0}
    with pytest.raises(grpc.RpcError) as bad:  # a NaN would make stats.json unreadable: refused, named
        stub.ReportMetrics(pb.MetricsReport(edge_id="e1", step=8, values={"loss": float("nan")}), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "loss" in bad.value.details()
    assert server.service.stats().edges["e1"].metrics == {"accuracy": 0.5, "uploaded": 8.0}
    time.sleep(0.2)
    server.stop(grace=1.0)
    reader.join(10)
    assert not reader.is_alive() and "error" not in outcome  # the stream ended cleanly (status OK)
    assert outcome["versions"][-1] == 2
    channel.close()
    deadline = time.monotonic() + 10
    def ours() -> set[threading.Thread]:  # grpc.aio's own poller thread is process-wide: grpc ends it when it likes
        return {t for t in set(threading.enumerate()) - before if "_poll_wrapper" not in t.name}

    while (left := ours()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, [t.name for t in left]
    log_dir = tmp_path / "cloud"
    assert (log_dir / "config.json").is_file() and (log_dir / "stats.json").is_file()
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"edge/e1/accuracy", "edge/e1/uploaded", "cloud/e1/loss/student_loss", "cloud/e1/loss/teacher_loss",
            "cloud/e1/queue", "cloud/e1/replay", "cloud/e1/step_latency_ms", "cloud/versions_per_s"} <= tags
    assert [e.value for e in acc.Scalars("edge/e1/accuracy")] == [0.5]
    assert len(acc.Scalars("cloud/e1/loss/student_loss")) == 2



def test_backlog_limit_refuses_with_resource_exhausted_and_recovers(models) -> None:
    """Beyond max_backlog waiting samples an upload is refused with a retryable code, not queued."""
    with pytest.raises(ValueError, match="max_backlog"):
        _config(max_backlog=0)
    with RunningCloud(models, _config(max_backlog=4)) as run:
        stub = run.stub
        stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10)
        with pytest.raises(grpc.RpcError) as exc:
            _upload(stub, 0, _images(6))
        assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 4" in exc.value.details()
        assert _upload(stub, 0, _images(3)).accepted == 3  # the refused sequence is still free
        assert run.server.service.stats().edges["e1"].samples == 3
        assert dict(exc.value.trailing_metadata())["retry-after-ms"] == "500"  # the hint: retry_after_s


def test_an_edge_waits_as_long_as_the_cloud_asks_before_retrying(models) -> None:
    """RESOURCE_EXHAUSTED carries retry-after-ms; the edge's backoff waits at least that long."""
    from edge.client import CloudClient, RetriesExhausted, RetryPolicy

    with RunningCloud(models, _config(max_backlog=4, retry_after_s=0.3)) as run:
        sleeps: list[float] = []
        policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02, max_total_s=5.0)
        with CloudClient(f"127.0.0.1:{run.server.port}", "e1", retry=policy, sleep=sleeps.append) as client:
            client.call("register", client.stub.Register, pb.RegisterRequest(edge_id="e1"), wait_for_ready=True)
            with pytest.raises(RetriesExhausted):
                client.upload(_images(6), np.full(6, 0.5, np.float32), 0)  # always over the backlog bound
        assert len(sleeps) == 2 and all(s >= 0.3 for s in sleeps)


def test_lockstep_acks_after_learning_with_the_resulting_version(models) -> None:
    """--lockstep: an upload's ack names the version its own steps produced (reproducible runs)."""
    with RunningCloud(models, _config(lockstep=True)) as run:
        stub = run.stub
        stub.Register(pb.RegisterRequest(edge_id="e1"), timeout=10)
        assert _upload(stub, 0, _images(4)).latest_version == 1  # one full cloud batch: one step
        assert _upload(stub, 1, _images(2)).latest_version == 1  # < batch, replay < start: no step
        assert _upload(stub, 2, _images(8, seed=3)).latest_version == 3  # two batches (queue 2+8 → 2 steps)
        assert run.server.service.learner("e1").queue_size == 2


def test_an_edge_running_its_own_model_file_gets_a_student_starting_from_it(models, tmp_path: Path) -> None:
    """Per-domain edges: each runs its client's normalization layers; the cloud, given those files,
    starts that edge's student (and its resets) from the file the edge registered with."""
    from server.cloud_cli import _extra_edge_states, read_edge_model

    student = copy.deepcopy(models[0])
    primary = export_onnx(student, tmp_path / "edge.onnx", (3, SIZE, SIZE)).path
    own = get_norm_state(student)
    own = {k: (v * 0.5 + 0.1 if not k.endswith("running_var") else v * 2.0).astype(np.float32) for k, v in own.items()}
    personal = copy.deepcopy(student)
    set_norm_state(personal, own)
    path = export_onnx(personal, tmp_path / "client1.onnx", (3, SIZE, SIZE)).path
    cfg = _config(edge_models=(str(path),))
    states = _extra_edge_states(cfg, read_edge_model(primary))
    sha = file_sha256(path)
    assert set(states) == {sha}
    server = CloudServer(models[0], models[1], cfg, preprocess=Preprocess(), edge_model_sha256=file_sha256(primary),
                         edge_states=states)
    with server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=GRPC_OPTIONS)
        stub = pb_grpc.EdgeServiceStub(channel)
        stub.Register(pb.RegisterRequest(edge_id="own", model_sha256=sha), timeout=10)
        stub.Register(pb.RegisterRequest(edge_id="plain", model_sha256=file_sha256(primary)), timeout=10)
        for k, v in server.service.learner("own").norm_state().items():
            np.testing.assert_allclose(v, own[k], rtol=1e-6)
        base = get_norm_state(models[0])
        for k, v in server.service.learner("plain").norm_state().items():
            np.testing.assert_array_equal(v, base[k])
        _upload(stub, 0, _images(8), edge="own")
        assert server.service.wait_idle(30)
        stub.Reset(pb.ResetRequest(edge_id="own", episode=1), timeout=10)
        for k, v in server.service.learner("own").norm_state().items():
            np.testing.assert_allclose(v, own[k], rtol=1e-6)  # a reset returns to the edge's own model
        channel.close()
    other = export_onnx(create_model("edge_cnn", 5, image_size=SIZE, width=8), tmp_path / "c5.onnx", (3, SIZE, SIZE))
    with pytest.raises(ValueError, match="differs from edge_model in class_names"):
        _extra_edge_states(_config(edge_models=(str(other.path),)), read_edge_model(primary))
