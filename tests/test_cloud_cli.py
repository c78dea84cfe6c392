"""``fedshift cloud`` as a process: binds a free port, serves, stops cleanly on SIGTERM.
Also the built-in model trainer and cache, at a toy size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from core.models import create_model
from core.teacher import SupervisedConfig, augment_images, cache_dir, cached_model, robustness_report
from protos.codec import GRPC_OPTIONS, encode_array
from protos.contract import file_sha256
from protos.fedshift.v1 import edge_pb2 as pb
from protos.fedshift.v1 import edge_pb2_grpc as pb_grpc
from server.stats import CloudStats

ROOT = Path(__file__).resolve().parents[1]


def test_cloud_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    weights = tmp_path / "edge.pt"
    torch.save(create_model("edge_cnn", 10, image_size=16).state_dict(), weights)
    port_file, out = tmp_path / "port", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cloud_cli", "--port", "0", "--port-file", str(port_file), "--method", "tent",
         "--student-weights", str(weights), "--image-size", "16", "--batch-size", "4", "--out", str(out),
         "--token", "t0k", "--insecure"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_file.is_file(), proc.stdout.read() if proc.poll() is not None else "no port file"
        port = int(port_file.read_text())
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
            stub = pb_grpc.EdgeServiceStub(channel)
            assert stub.Register(pb.RegisterRequest(edge_id="e", auth_token="t0k"), timeout=10).version == 0
            images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
            reply = stub.Upload(pb.UploadRequest(edge_id="e", sequence=0, images=encode_array(images),
                                                 auth_token="t0k"), timeout=10)
            assert reply.accepted == 4
            update = next(stub.Subscribe(pb.SubscribeRequest(edge_id="e", auth_token="t0k"), timeout=20))
            assert update.version == 1
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert f"listening on 127.0.0.1:{port}" in output
    stats = CloudStats.read(out / "cloud" / "stats.json")
    assert stats.edges["e"].samples == 4 and stats.learners["e"].version == 1
    info = json.loads((out / "cloud" / "config.json").read_text())
    assert info["cloud"]["token"] == "***"
    # no edge model given: the cloud exported its student, and preprocesses uploads with that file's metadata
    assert info["edge_model"] == str(out / "cloud" / "edge.onnx") and (out / "cloud" / "edge.onnx").is_file()
    assert info["edge_model_sha256"] == file_sha256(out / "cloud" / "edge.onnx")


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSHIFT_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("FEDSHIFT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "fedshift"


def test_augmentation_is_seeded_and_partial() -> None:
    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    a = augment_images(images, ("gaussian_noise", "contrast"), 0.5, 8, np.random.default_rng(1))
    b = augment_images(images, ("gaussian_noise", "contrast"), 0.5, 8, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    changed = (a != images).reshape(40, -1).any(axis=1)
    assert changed.sum() == 20  # exactly the requested fraction
    np.testing.assert_array_equal(augment_images(images, (), 0.5, 8, np.random.default_rng(1)), images)


def test_cached_model_trains_once_and_reloads(tmp_path: Path) -> None:
    config = SupervisedConfig(model="edge_cnn", model_kwargs=(("width", 8),), image_size=16, epochs=2,
                              steps_per_epoch=2, batch_size=16, augment=("gaussian_noise",), augment_chunk=8)
    assert config.key() != SupervisedConfig(model="edge_cnn", model_kwargs=(("width", 8),), image_size=16,
                                            epochs=3, steps_per_epoch=2, batch_size=16).key()
    model, path = cached_model(config, tmp_path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    mtime = path.stat().st_mtime_ns
    again, same = cached_model(config, tmp_path)
    assert same == path and path.stat().st_mtime_ns == mtime  # loaded, not retrained
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    from core.data import Split

    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8), rng.integers(0, 10, 20).astype(np.int64))
    report = robustness_report(model, split, corruptions=("fog", "contrast"), batch_size=8)
    assert set(report["corrupted"]) == {"fog", "contrast"}
    assert 0 <= report["corrupted_mean_batch_stats"] <= 1 and 0 <= report["clean"]["eval"] <= 1


def test_cloud_refuses_an_edge_model_normalizing_otherwise(tmp_path: Path) -> None:
    from core.cema import CemaConfig
    from core.export import export_onnx
    from core.models import create_model
    from server.cloud_cli import _edge_model
    from server.config import CloudConfig

    model = create_model("edge_cnn", 10, width=8)
    path = tmp_path / "bs.onnx"
    export_onnx(model, path, (3, 32, 32), batch_stats=True)
    ok = CloudConfig(edge_model=str(path))
    assert _edge_model(ok, model)[1].batch_stats
    with pytest.raises(ValueError, match="edge_norm is 'running'"):
        _edge_model(CloudConfig(edge_model=str(path), cema=CemaConfig(edge_norm="running")), model)


def test_batch_stats_predictions_follow_the_edge_batches_and_leave_the_model_alone() -> None:
    import numpy as np
    import torch

    from core.models import create_model
    from core.norm import get_norm_state
    from core.teacher import batch_stats_predictions
    from core.training import to_tensor

    torch.manual_seed(0)
    model = create_model("edge_cnn", 10, width=8).eval()
    before = get_norm_state(model)
    images = np.random.default_rng(0).integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)
    pred = batch_stats_predictions(model, images, batch_size=10)  # batches 10, 10 and a lone last sample
    probe = create_model("edge_cnn", 10, width=8)
    probe.load_state_dict(model.state_dict())
    probe.train()
    with torch.no_grad():
        expected = np.concatenate([probe(to_tensor(images[:10])).argmax(1).numpy(),
                                   probe(to_tensor(images[10:20])).argmax(1).numpy(),
                                   probe(to_tensor(images[11:21])).argmax(1).numpy()[-1:]])
    assert pred.dtype == np.int64 and np.array_equal(pred, expected)
    assert all(np.array_equal(v, get_norm_state(model)[k]) for k, v in before.items())
