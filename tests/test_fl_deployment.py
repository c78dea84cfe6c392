"""Flower's own engines, offline: `flwr run .` (managed local simulation SuperLink) and the
deployment engine (SuperLink + 2 SuperNodes on 127.0.0.1). Slow: each starts several processes,
and in deployment every message runs in a fresh ClientApp process that imports torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from simulations.flwr_local import _pids_with_arg, run_deployment, run_simulation_cli

pytestmark = pytest.mark.slow

SMALL = {"rounds": 2, "model-width": 0.125, "image-size": 16, "train-per-client": 40, "batch-size": 16}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _assert_all_stopped(work_dir: Path) -> None:
    assert not [p for p in _pids_with_arg(str(work_dir / "flwr-home")) if _alive(p)], "a Flower process survived"


def test_deployment_engine_two_supernodes(tmp_path: Path) -> None:
    results = run_deployment({**SMALL, "strategy": "fedbn", "seed": 3}, num_supernodes=2, work_dir=tmp_path,
                             timeout=900)
    assert results.strategy == "fedbn" and results.clients == 2
    assert [h.round for h in results.history] == [1, 2]
    assert set(results.per_client_accuracy) == {"mnist", "inverse"}
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    _assert_all_stopped(tmp_path)


def test_flwr_run_local_simulation(tmp_path: Path) -> None:
    results = run_simulation_cli({**SMALL, "strategy": "fraug"}, num_supernodes=2, work_dir=tmp_path, timeout=600)
    assert results.strategy == "fraug" and len(results.history) == 2
    _assert_all_stopped(tmp_path)


def test_deployment_engine_with_flower_tls_and_supernode_auth(tmp_path: Path) -> None:
    """Issue 12: the deployment path runs on Flower's own TLS and SuperNode authentication: both
    SuperNodes registered by key, the run completes over TLS, a plaintext client is refused."""
    import json
    import subprocess

    from simulations.flwr_local import _connection_body, _write_connection, flower_env, local_deployment, run_remote

    with local_deployment(2, tmp_path, secure=True) as deployment:
        assert deployment.root_certificates.endswith("ca.pem")
        results = run_remote({**SMALL, "strategy": "fedbn", "seed": 3, "clients": 2,
                              "out-dir": str(tmp_path / "run")}, superlink=deployment.superlink, work_dir=tmp_path,
                             timeout=900, root_certificates=deployment.root_certificates)
        assert [h.round for h in results.history] == [1, 2]
        home = tmp_path / "flwr-home"
        env = flower_env(home)
        listed = subprocess.run(["flwr", "supernode", "list", "remote", "--format", "json"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert len(json.loads(listed.stdout)["nodes"]) == 2
        _write_connection(home, "remote", f'address = "{deployment.superlink}"\ninsecure = true')
        plain = subprocess.run(["flwr", "supernode", "list", "remote"], env=env, capture_output=True, text=True,
                               timeout=120)
        assert plain.returncode != 0  # plaintext against the TLS SuperLink
        _write_connection(home, "remote", _connection_body(deployment))
    _assert_all_stopped(tmp_path)


def test_a_supernode_killed_during_the_run_does_not_stop_it(tmp_path: Path) -> None:
    """Issue 12: three SuperNodes, ``min-clients`` 2 and a 20 s round timeout; SuperNode 2 is killed
    (SIGKILL) once round 1 is recorded. The run still completes every round, the later ones with
    the two clients left (each round waits at most the timeout for the dead one's reply)."""
    import signal
    import threading
    import time

    from core.fl_config import FLResult
    from simulations.flwr_local import local_deployment, run_remote

    out = tmp_path / "run"
    done: dict = {}
    config = {**SMALL, "rounds": 4, "clients": 3, "min-clients": 2, "round-timeout-s": 20.0, "strategy": "fedbn",
              "seed": 3, "out-dir": str(out)}
    with local_deployment(3, tmp_path) as deployment:
        run = threading.Thread(target=lambda: done.update(results=run_remote(
            config, superlink=deployment.superlink, work_dir=tmp_path, timeout=900)), daemon=True)
        run.start()
        deadline = time.monotonic() + 600
        while run.is_alive() and time.monotonic() < deadline:
            path = out / "results.json"
            if path.is_file() and FLResult.read(path).history:
                break
            time.sleep(1.0)
        (victim,) = _pids_with_arg("partition-id=2 num-partitions=3")
        os.kill(victim, signal.SIGKILL)
        run.join(900)
    results = done["results"]
    assert [h.round for h in results.history] == [1, 2, 3, 4]
    assert len(results.history[0].clients) == 3 and len(results.history[-1].clients) == 2
    _assert_all_stopped(tmp_path)
