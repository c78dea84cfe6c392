"""A failed simulation runtime must not leave the process waiting on its ServerApp thread."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server.app import SimulationStopped, stop_polling_when

# Ray's start-up fails as it does on a loaded machine; the round timeout is long, so a ServerApp
# thread left polling would hold the process for 10 minutes.
_FAILED_RAY = """
import sys, time, ray
def fail(*args, **kwargs):
    raise RuntimeError("Timed out waiting for file gcs_server_port (simulated)")
ray.init = fail
from core.fl_config import FLConfig
from simulations.fl_role import FLRun, SimulationResources
from simulations.fl_sim import run_fl_simulation
cfg = FLConfig.from_run_config({"clients": 2, "rounds": 1, "model-width": 0.125, "image-size": 16,
      "train-per-client": 40, "batch-size": 16, "round-timeout-s": 600, "out-dir": sys.argv[1]})
try:
    run_fl_simulation(FLRun(fl=cfg, simulation=SimulationResources(num_cpus=2)))
except RuntimeError as e:
    print("run_fl_simulation raised:", e, flush=True)
"""


def test_failed_runtime_lets_the_process_exit(tmp_path: Path) -> None:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _FAILED_RAY, str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=240, cwd=Path(__file__).resolve().parents[1])
    assert "run_fl_simulation raised: An error was encountered" in out.stdout, out.stderr[-2000:]
    assert time.monotonic() - started < 200  # the process ended, it did not wait out the round timeout


def test_stopped_grid_polls_raise() -> None:
    """Once the event is set, the in-memory grid's polling calls raise instead of answering."""
    from flwr.superlink.grid import InMemoryGrid

    grid = InMemoryGrid.__new__(InMemoryGrid)  # no link state needed: the polls are replaced
    calls: list[str] = []
    grid.pull_messages = lambda ids: calls.append("pull") or []  # type: ignore[method-assign]
    grid.get_node_ids = lambda: calls.append("nodes") or [1, 2]  # type: ignore[method-assign]
    stop = threading.Event()
    stop_polling_when(grid, stop)
    assert (list(grid.pull_messages({"m"})), list(grid.get_node_ids())) == ([], [1, 2])
    stop.set()
    with pytest.raises(SimulationStopped):
        grid.pull_messages({"m"})
    with pytest.raises(SimulationStopped):
        grid.get_node_ids()
    assert calls == ["pull", "nodes"]
