"""`fedshift adapt` end to end: a cloud process and two edge processes on loopback."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from core.models import create_model
from edge.config import EdgeConfig, NodeConfig
from edge.summary import EdgeSummary
from protos.config import load_config
from protos.contract import file_sha256
from server.config import CloudConfig
from simulations.adapt import METHODS, AdaptConfig, AdaptResult, run_adapt


def _live_processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Untrained models: this test checks the plumbing, not accuracy (no cache, no training)."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(create_model("edge_cnn", 10).state_dict(), d / "edge.pt")
    torch.save(create_model("teacher_resnet", 10).state_dict(), d / "teacher.pt")
    return d


def test_cema_with_two_edge_processes(tmp_path, weights) -> None:
    out = tmp_path / "run"
    cfg = AdaptConfig(method="distill_all", edges=2, corruptions=("contrast", "fog"), limit=96,
                      edge=EdgeConfig(batch_size=32, node=NodeConfig(sync_timeout_s=2.0)),
                      cloud=CloudConfig(student_weights=str(weights / "edge.pt"),
                                        teacher_weights=str(weights / "teacher.pt")))
    results = run_adapt(cfg, out)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["method"] == "distill_all" and on_disk["edges"] == 2
    for key in ("accuracy", "no_adapt_accuracy", "seen", "uploaded", "bytes_up", "bytes_down", "versions_applied"):
        assert key in on_disk
    assert AdaptResult.read(out / "results.json") == results and results.config == cfg
    assert results.seen == 2 * 96
    assert results.uploaded == results.kept == 2 * 96  # distill_all uploads everything
    assert set(results.accuracy.per_corruption) == {"contrast", "fog"}
    assert results.versions_applied > 2  # the two reset states plus cloud updates
    assert results.bytes_down > 0 and results.bytes_up > 96 * 32 * 32 * 3
    # the cloud's own counters, checked against the edges' in the type: every acked sample arrived
    assert results.cloud is not None and results.cloud.samples == results.uploaded
    assert set(results.cloud.edges) == {"edge0", "edge1"}
    assert 0.0 <= results.accuracy.overall <= 1.0
    assert set(results.bn_stats_accuracy.per_corruption) == {"contrast", "fog"}  # the no-cloud reference
    # the children ran from the config files the launcher wrote; each edge ran the batch-statistics export
    cloud = load_config(CloudConfig, out / "configs" / "cloud.toml")
    assert cloud.cema.method == "distill" and cloud.lockstep and cloud.edge_model == str(out / "models" /
                                                                                            "edge_batch_stats.onnx")
    for i in range(2):
        edge = load_config(EdgeConfig, out / "configs" / f"edge{i}.toml")
        assert edge.selection.method == "all" and edge.batch_size == 32 and edge.node.limit == 96
        summary = EdgeSummary.read(edge.out)
        assert summary.model.path == cloud.edge_model and summary.model.sha256 == file_sha256(cloud.edge_model)
    # TensorBoard: cloud and one run per edge
    assert list((out / "cloud").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "edges" / "edge0"))
    acc.Reload()
    assert {"edge/online_accuracy", "edge/upload_rate", "edge/version"} <= set(acc.Tags()["scalars"])
    assert not _live_processes_mentioning(str(out)), "a process outlived the run"


def test_forward_only_baseline_needs_no_cloud(tmp_path, weights) -> None:
    cfg = AdaptConfig(method="bn_stats", edges=1, corruptions=("contrast",), limit=64,
                      cloud=CloudConfig(student_weights=str(weights / "edge.pt")))
    results = run_adapt(cfg, tmp_path / "bn")
    assert results.uploaded == 0 and results.bytes_up == 0
    # the edge process and the in-process reference compute the same thing
    assert results.accuracy == results.bn_stats_accuracy
    assert not (tmp_path / "bn" / "cloud").exists()


def test_config_and_aggregate_validation() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        AdaptConfig(method="magic")
    with pytest.raises(ValueError, match="random_rate"):
        AdaptConfig(method="random")
    with pytest.raises(ValueError, match="each edge needs one"):
        AdaptConfig(edges=3, corruptions=("fog", "snow"))
    assert set(METHODS) >= {"no_adapt", "bn_stats", "tent", "eata", "cema", "distill_all", "random"}
    assert AdaptConfig().with_random_rate(0.3).edge.selection.random_rate == 0.3


def test_running_edges_oracle_and_validation_streams(tmp_path, weights) -> None:
    """edge_norm = running: the edge runs the running-statistics export, the cloud learns in running
    mode and sends statistics that move; the oracle's stream carries the teacher's predictions."""
    from protos.contract import load_stream_npz

    out = tmp_path / "run"
    cfg = AdaptConfig(method="oracle", corruptions=("contrast",), limit=96, edge_norm="running", split="val",
                      edge=EdgeConfig(batch_size=32, node=NodeConfig(sync_timeout_s=2.0)),
                      cloud=CloudConfig(student_weights=str(weights / "edge.pt"),
                                        teacher_weights=str(weights / "teacher.pt")))
    results = run_adapt(cfg, out)
    assert results.edge_norm == "running" and results.method == "oracle"
    cloud = load_config(CloudConfig, out / "configs" / "cloud.toml")
    assert cloud.cema.edge_norm == "running" and cloud.edge_model == str(out / "models" / "edge.onnx")
    segment = load_stream_npz(out / "streams" / "edge0.npz").segments[0]
    assert segment.reference is not None and segment.reference.shape == segment.labels.shape
    summary = EdgeSummary.read(out / "edges" / "edge0.json")
    assert summary.selection.method == "oracle" and summary.kept == results.uploaded
    assert results.bn_stats_accuracy is not None  # the no-cloud baselines are measured in every mode


def test_edge_norm_of_baselines_and_split_validation() -> None:
    assert AdaptConfig(method="no_adapt", edge_norm="batch").norm == "source"
    assert AdaptConfig(method="bn_stats", edge_norm="running").norm == "batch"
    assert AdaptConfig(method="cema", edge_norm="running").norm == "running"
    with pytest.raises(ValueError, match="split"):
        AdaptConfig(split="train")
    with pytest.raises(ValueError, match="edge_norm"):
        AdaptConfig(cloud=CloudConfig(cema=CloudConfig().cema.__class__(edge_norm="running")))


def test_domain_streams_run_each_clients_own_model(tmp_path, weights) -> None:
    """streams = domain + client_models: edge i streams client i's test images and runs client i's
    file; the cloud gets every such file, and the no-cloud baselines use each edge's own model."""
    from core.export import export_onnx
    from core.norm import get_norm_state, set_norm_state
    from core.data.builtin import BuiltinData

    clients = tmp_path / "clients"
    for i in range(2):
        model = create_model("edge_cnn", 10)
        model.load_state_dict(torch.load(weights / "edge.pt"))
        set_norm_state(model, {k: v * (1 + 0.5 * i) for k, v in get_norm_state(model).items()})
        for name, bs in (("edge.onnx", False), ("edge_batch_stats.onnx", True)):
            export_onnx(model.eval(), clients / str(i) / name, (3, 32, 32), batch_stats=bs)
    out = tmp_path / "run"
    cfg = AdaptConfig(method="cema", edges=2, corruptions=("contrast", "fog"), limit=64, streams="domain",
                      client_models=str(clients), edge=EdgeConfig(batch_size=32, node=NodeConfig(sync_timeout_s=2.0)),
                      cloud=CloudConfig(student_weights=str(weights / "edge.pt"),
                                        teacher_weights=str(weights / "teacher.pt")))
    results = run_adapt(cfg, out)
    cloud = load_config(CloudConfig, out / "configs" / "cloud.toml")
    assert cloud.edge_models == tuple(str((clients / str(i) / "edge_batch_stats.onnx").resolve()) for i in range(2))
    data = BuiltinData().make(0, 32)
    from protos.contract import load_stream_npz

    for i in range(2):
        summary = EdgeSummary.read(out / "edges" / f"edge{i}.json")
        assert summary.model.path == cloud.edge_models[i]
        seg = load_stream_npz(out / "streams" / f"edge{i}.npz").segments[0]
        assert len(seg.images) == len(data.clients[i].test)  # the client's own held-out images, corrupted
        assert np.array_equal(np.sort(seg.labels), np.sort(data.clients[i].test.labels))
    log = "\n".join(p.read_text() for p in (out / "logs").glob("cloud*"))
    assert log.count("starts from its edge's own model file") == 2  # each student starts from its edge's file
    assert results.config.streams == "domain" and results.bn_stats_accuracy is not None
    with pytest.raises(ValueError, match="set streams = domain"):
        AdaptConfig(client_models=str(clients))
    with pytest.raises(ValueError, match="domains for 6 edges"):
        AdaptConfig(streams="domain", edges=6, corruptions=("fog",) * 6)
