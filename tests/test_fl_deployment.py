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
