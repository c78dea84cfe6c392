"""A failed simulation runtime: retried once when Ray did not start, and never leaving the
process waiting on its ServerApp thread."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server.app import SimulationStopped, stop_polling_when

# Ray's start-up fails as it does on a loaded machine (FAILS times, then the real ray.init); the
# round timeout is long, so a ServerApp thread left polling would hold the process for 10 minutes.
_FAILING_RAY = """
import sys, ray
from core.fl_config import FLConfig, FLResult
from simulations.fl_role import FLRun, SimulationResources
from simulations.fl_sim import run_fl_simulation
real_init, fails = ray.init, [int(sys.argv[2])]
def init(*args, **kwargs):
    if fails[0] > 0:
        fails[0] -= 1
        raise RuntimeError("Timed out waiting for file gcs_server_port (simulated)")
    return real_init(*args, **kwargs)
ray.init = init
cfg = FLConfig.from_run_config({"clients": 2, "rounds": 1, "model-width": 0.125, "image-size": 16,
      "train-per-client": 40, "batch-size": 16, "round-timeout-s": 600, "out-dir": sys.argv[1]})
try:
    result = run_fl_simulation(FLRun(fl=cfg, simulation=SimulationResources(num_cpus=2)))
    print("rounds run:", len(result.history), flush=True)
except RuntimeError as e:
    print("run_fl_simulation raised:", e, flush=True)
"""


def _run_with_failing_ray(out: Path, fails: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FAILING_RAY, str(out), str(fails)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])


def test_a_runtime_that_never_starts_lets_the_process_exit(tmp_path: Path) -> None:
    """Ray fails twice: the one retry fails too, the error is raised and the process ends, it
    does not wait out the round timeout."""
    started = time.monotonic()
    out = _run_with_failing_ray(tmp_path / "run", fails=2)
    assert "run_fl_simulation raised: An error was encountered" in out.stdout, out.stderr[-2000:]
    assert "retrying the run once" in out.stderr
    assert time.monotonic() - started < 200


def test_a_run_whose_ray_did_not_start_is_retried_once(tmp_path: Path) -> None:
    """Ray fails once: the retry runs the whole run, and its results are the run's."""
    out = _run_with_failing_ray(tmp_path / "run", fails=1)
    assert "rounds run: 1" in out.stdout, out.stderr[-3000:]
    assert out.stderr.count("retrying the run once") == 1


def test_only_a_failure_inside_rays_start_up_is_retried() -> None:
    from simulations.fl_sim import ray_failed_to_start, root_cause

    def init_ray() -> None:
        raise RuntimeError("Timed out waiting for file gcs_server_port")

    def crashed(inner) -> RuntimeError:
        try:
            try:
                inner()
            except Exception as ex:
                raise RuntimeError("Simulation Runtime crashed.") from ex
        except RuntimeError as outer:
            return outer

    def train() -> None:
        raise ValueError("a bug in the client")

    assert ray_failed_to_start(crashed(init_ray)) and not ray_failed_to_start(crashed(train))
    assert str(root_cause(crashed(init_ray))) == "Timed out waiting for file gcs_server_port"


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
    grid.push_messages = lambda messages: ["m"]  # type: ignore[method-assign]
    grid.pull_interval = 0.001
    with pytest.raises(SimulationStopped):  # Flower's own wait loop goes through the wrapped poll
        grid.send_and_receive([], timeout=30)
    with pytest.raises(SimulationStopped):
        grid.pull_messages({"m"})
    with pytest.raises(SimulationStopped):
        grid.get_node_ids()
    assert calls == ["pull", "nodes"]  # nothing was polled once stopped
