"""Run one federated experiment in Flower's simulation engine, in this process.

Flower 1.42 still ships the in-process ``flwr.simulation.run_simulation`` (deprecated in favour
of ``flwr run``, which needs a SuperLink and packages the app as a FAB). It hands apps an empty
run config, so the settings travel as overrides baked into the apps built here — the same
``FLConfig`` keys ``flwr run --run-config`` accepts. Ray is started and shut down by Flower's Ray
backend within the call.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from core.fl_config import FLResult
from simulations.fl_role import ROLE_FILE, FLRun

log = logging.getLogger(__name__)
RETRY_DELAY_S = 5.0  # before the one retry of a run whose Ray did not start

# Environment for every Flower process we start: no telemetry, no update check, no dependency
# installation at run time (it would pull a multi-GB CUDA torch into a fresh environment).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


@contextmanager
def run_env(threads: int) -> Iterator[None]:
    """The environment one run's Ray workers inherit from this process: :data:`FLOWER_ENV` (the
    same for every run, left set: Flower may read it at exit) and ``OMP_NUM_THREADS = threads``,
    removed again afterwards, so the next run in this process gets its own count, not the first
    run's. A variable the user set keeps the user's value."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    ours = "OMP_NUM_THREADS" not in os.environ
    if ours:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if ours:
            os.environ.pop("OMP_NUM_THREADS", None)


def backend_config(num_cpus: int, cpus_per_client: int) -> dict[str, Any]:
    """Ray resources: ``num_cpus // cpus_per_client`` clients train in parallel."""
    if cpus_per_client < 1 or num_cpus < cpus_per_client:
        raise ValueError(f"need 1 <= cpus-per-client ({cpus_per_client}) <= num-cpus ({num_cpus})")
    return {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False}}


def quiet_flower(verbose: bool = False) -> None:
    """Flower logs every round's full metric dump through its own handler *and* the root logger
    (twice on screen); keep its handler only, at WARNING unless ``verbose``. Our recorder logs
    one progress line per round instead."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from (or during), outermost first; a cycle ends it."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from`` (or during-handling) chain."""
    return list(exception_chain(exc))[-1]


def ray_failed_to_start(exc: BaseException) -> bool:
    """Whether the simulation failed inside Flower's Ray start-up (``RayBackend.init_ray``).

    Why: on a loaded machine Ray's GCS server can miss its 30 s start-up deadline ("Timed out
    waiting for file .../gcs_server_port_..."); nothing has run yet, so one retry is safe. Any other
    failure is the run's own and is raised as it is."""
    return any(frame.f_code.co_name == "init_ray"
               for e in exception_chain(exc) for frame, _ in traceback.walk_tb(e.__traceback__))


def _shut_ray_down() -> None:
    """Whatever a failed start left of Ray in this process goes before the retry."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_fl_simulation(run: FLRun, *, verbose: bool = False) -> FLResult:
    """Run the federated experiment ``run`` describes; write ``fl.toml`` (the resolved settings),
    results.json, checkpoint and TensorBoard events to its output folder; return the result.
    A run whose Ray did not start is retried once (:func:`ray_failed_to_start`)."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import ServerThreadLink, make_server_app, output_dir
    from server.recorder import RESULTS_FILE

    cfg, res = run.fl, run.simulation
    quiet_flower(verbose)
    cpus = res.num_cpus or min(os.cpu_count() or 1, cfg.clients * res.cpus_per_client)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    run.write(out / ROLE_FILE)
    results_path = out / RESULTS_FILE
    log.info("simulation: %s, %d clients on %d CPU(s), %d round(s) -> %s", cfg.strategy, cfg.clients, cpus,
             cfg.rounds, out)
    overrides = cfg.to_run_config()
    with warnings.catch_warnings(), run_env(cfg.threads):
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for attempt in (1, 2):
            if results_path.exists() and not cfg.resume:
                results_path.unlink()  # a fresh run (or a retry) writes its own
            link = ServerThreadLink()  # a failed runtime must not leave the ServerApp thread waiting
            try:
                run_simulation(server_app=make_server_app(overrides, link=link),
                               client_app=make_client_app(overrides), num_supernodes=cfg.clients,
                               backend_config=backend_config(cpus, res.cpus_per_client))
                break
            except RuntimeError as exc:
                if attempt == 2 or not ray_failed_to_start(exc):
                    raise
                cause = root_cause(exc)
            finally:
                ended = link.stop_and_wait()
            if not ended:  # it could still write into the run folder: no retry into it
                raise RuntimeError(f"Ray did not start ({cause}), and the ServerApp thread did not stop: "
                                   "not retrying")
            log.warning("Ray did not start (%s); retrying the run once in %g s", cause, RETRY_DELAY_S)
            _shut_ray_down()
            time.sleep(RETRY_DELAY_S)
    if not results_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {results_path}")
    return FLResult.read(results_path)
