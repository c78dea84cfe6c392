"""``fedshift edge check`` (each broken part named with its fix), ``fedshift edge status`` (the
state file a running edge keeps) and JSON log lines. Torch-free parts, a fake cloud."""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge.health import EdgeState, problems, read_state, write_state
from edge.logs import JsonFormatter
from edge.node import EdgeNode, NodeConfig
from edge.runtime import EdgeRuntime
from edge.selection import EntropySelector, SelectionConfig
from edge.sources import NpzSource, save_stream_npz
from simulations.cli import main as fedshift


@pytest.fixture(scope="module")
def stream_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    segs = [("fog", 5, rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 12))]
    return save_stream_npz(tmp_path_factory.mktemp("stream") / "s.npz", segs, "reset")


def _config(tmp_path: Path, **settings) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = tmp_path / "edge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _check(path: Path, capsys) -> tuple[int, str]:
    rc = fedshift(["edge", "check", "--config", str(path), "--connect-timeout", "2"])
    return rc, capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_working_setup_passes(cloud, model_path, stream_path, tmp_path, capsys) -> None:
    fake, address = cloud
    rc, out = _check(_config(tmp_path, server=address, model=str(model_path), source=f"npz:{stream_path}",
                             edge_id="board-1", insecure=True), capsys)
    assert rc == 0, out
    assert [line.split()[0] for line in out.splitlines()[:4]] == ["ok"] * 4
    assert "inference ok" in out and "registered as board-1" in out and "the setup works" in out
    assert [r.edge_id for r in fake.registered] == ["board-1"]


def test_each_broken_part_is_named_with_its_fix(cloud, model_path, stream_path, tmp_path, capsys) -> None:
    fake, address = cloud
    good = dict(server=address, model=str(model_path), source=f"npz:{stream_path}", edge_id="board-1", insecure=True)
    # a wrong server: nothing listens there
    rc, out = _check(_config(tmp_path, **{**good, "server": f"127.0.0.1:{_free_port()}"}), capsys)
    assert rc == 1 and "FAIL  connection: no answer from" in out and "check the server address and port" in out
    # a bad model file
    bad_model = tmp_path / "bad.onnx"
    bad_model.write_bytes(b"not an onnx file")
    rc, out = _check(_config(tmp_path, **{**good, "model": str(bad_model)}), capsys)
    assert rc == 1 and "FAIL  model:" in out and "re-export it with `fedshift export`" in out
    rc, out = _check(_config(tmp_path, **{**good, "model": str(tmp_path / "missing.onnx")}), capsys)
    assert rc == 1 and "does not exist" in out
    # a missing TLS file
    tls = {k: v for k, v in good.items() if k != "insecure"}
    rc, out = _check(_config(tmp_path, **tls, tls_ca=str(tmp_path / "no-ca.pem")), capsys)
    assert rc == 1 and "FAIL  connection:" in out and "no-ca.pem" in out and "tls_ca" in out
    # a refused credential
    fake.token = "the-right-one"
    rc, out = _check(_config(tmp_path, **good, token="a-wrong-one"), capsys)
    assert rc == 1 and "FAIL  connection: the cloud refused the credential" in out and "fedshift creds add" in out
    # a bad source, and no edge id
    rc, out = _check(_config(tmp_path, **{**good, "source": f"npz:{tmp_path / 'none.npz'}"}), capsys)
    assert rc == 1 and "FAIL  source:" in out
    rc, out = _check(_config(tmp_path, **{k: v for k, v in good.items() if k != "edge_id"}), capsys)
    assert rc == 1 and "FAIL  config: no edge_id" in out


def test_a_running_edge_keeps_a_state_file_that_status_reads(model_path, stream_path, tmp_path, capsys) -> None:
    state_file = tmp_path / "state" / "edge.json"
    runtime = EdgeRuntime(model_path)
    node = EdgeNode(runtime, NpzSource(stream_path, 4), None,
                    EntropySelector(SelectionConfig(num_classes=runtime.num_classes, method="all")),
                    config=NodeConfig(state_file=str(state_file), state_every_s=0.05), edge_id="board-2")
    node.run()
    state = read_state(state_file)
    assert state.edge_id == "board-2" and not state.running and state.seen == 12 and state.server is None
    config = _config(tmp_path, model=str(model_path), source=f"npz:{stream_path}", server="none")
    config.write_text(config.read_text() + f'[node]\nstate_file = "{state_file}"\n')
    assert fedshift(["edge", "status", "--config", str(config)]) == 1  # it stopped
    out = capsys.readouterr().out
    assert "edge board-2" in out and "stopped" in out and "problem: the edge stopped" in out
    write_state(state_file, replace(state, running=True, written_unix=time.time()))  # as a running edge writes it
    assert fedshift(["edge", "status", "--config", str(config)]) == 0
    assert "running" in capsys.readouterr().out


def test_health_rules() -> None:
    now = 1000.0
    well = EdgeState(edge_id="e", pid=1, written_unix=now - 1, started_unix=now - 100, running=True, server="c:1",
                     cloud_reachable=True, buffered_samples=10, buffer_bound=100, last_upload_unix=now - 2,
                     last_version_unix=now - 3)
    assert problems(well, now=now) == []
    assert "stuck or dead" in problems(replace(well, written_unix=now - 120), now=now)[0]
    assert "unreachable" in problems(replace(well, cloud_reachable=False), now=now)[0]
    assert "90% full" in problems(replace(well, buffered_samples=90), now=now)[0]
    assert "no parameter update" in problems(replace(well, last_version_unix=now - 90), now=now)[0]


def test_json_log_lines() -> None:
    record = logging.LogRecord("edge.node", logging.WARNING, __file__, 1, "seen %d", (5,), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning" and line["logger"] == "edge.node" and line["message"] == "seen 5"
    assert line["time"].endswith("Z")
