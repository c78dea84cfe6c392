"""The Flower ServerApp: parse the run config once, pick a strategy, run it, record everything.

``flwr run .`` loads the module-level :data:`app`; ``fedshift fl`` builds one with
:func:`make_server_app` and its flags as overrides (the in-process simulation API gives apps an
empty run config).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from core.fl_config import PARTITION_KEY, FLConfig, FLResult, RoundRecord, build_model, local_key_filter
from server.recorder import CHECKPOINT_FILE, RESULTS_FILE, Checkpoint, RunRecorder, load_checkpoint, save_checkpoint
from server.strategies import RoundEnd, make_strategy

log = logging.getLogger(__name__)

# Flower's in-memory grid (the simulation engine's) sleeps ``pull_interval`` = 0.1 s between polls
# for replies, so every send-and-receive (two a round) idles ~0.05 s on average after the last
# reply is in (benchmarks/fl_overhead.py: ~0.1 s of a 0.6 s round). A poll of the in-memory link
# state is a few dict look-ups under a lock, so poll every 5 ms instead.
REPLY_POLL_SECONDS = 0.005


def poll_replies_often(grid: Grid) -> None:
    """Shorten the simulation grid's reply-polling interval (a no-op for the deployment grid)."""
    from flwr.superlink.grid import InMemoryGrid

    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = min(grid.pull_interval, REPLY_POLL_SECONDS)


class SimulationStopped(RuntimeError):
    """The simulation runtime ended while the ServerApp was still waiting on it."""


class ServerThreadLink:
    """Between the launcher of one ``run_simulation`` call and the ServerApp thread Flower starts
    for it: the launcher sets ``runtime_done`` once the call is back (the grid's polls then raise,
    :func:`stop_polling_when`) and can wait for the thread to end before it starts another run
    into the same folder."""

    def __init__(self) -> None:
        self.runtime_done = threading.Event()
        self._thread: threading.Thread | None = None

    def entered(self) -> None:
        """Called by the ServerApp's main, on its thread."""
        self._thread = threading.current_thread()

    def stop_and_wait(self, timeout: float = 30.0) -> bool:
        """Stop the ServerApp's waiting and wait for its thread; True if it ended, or if the main
        never ran (nothing of the run was started that could write into its folder)."""
        self.runtime_done.set()
        if self._thread is None or self._thread is threading.current_thread():
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()


def stop_polling_when(grid: Grid, stop: threading.Event) -> None:
    """Make the simulation grid's polls raise :class:`SimulationStopped` once ``stop`` is set.

    Why: when Flower's simulation runtime fails (Ray's GCS server does not start, say),
    ``run_simulation`` returns, but the ServerApp thread it started keeps polling for replies that
    will never come, for up to ``round-timeout-s`` (default an hour), and being a non-daemon thread
    it holds the process open that long. Flower's own stop event is private to the call, so the
    launcher passes its own and sets it once ``run_simulation`` is back. A no-op for the deployment
    grid, whose ServerApp runs in its own process.
    """
    from flwr.superlink.grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid):
        return

    def stoppable(poll: Any) -> Any:
        def checked(*args: Any, **kwargs: Any) -> Any:
            if stop.is_set():
                raise SimulationStopped("the simulation runtime has stopped; the ServerApp stops waiting")
            return poll(*args, **kwargs)
        return checked

    # send_and_receive and wait_for_nodes call these on the instance, in their polling loops
    grid.pull_messages = stoppable(grid.pull_messages)  # type: ignore[method-assign]
    grid.get_node_ids = stoppable(grid.get_node_ids)  # type: ignore[method-assign]


def output_dir(cfg: FLConfig) -> Path:
    """``out-dir``, or ``runs/<run name>`` under the working directory."""
    return Path(cfg.out_dir) if cfg.out_dir else Path("runs") / cfg.run_name


def _previous_history(ckpt_path: Path, upto: int) -> tuple[RoundRecord, ...]:
    """History of the run a checkpoint came from (results.json beside it), cut at its round."""
    results = (ckpt_path if ckpt_path.is_dir() else ckpt_path.parent) / RESULTS_FILE
    if not results.is_file():
        return ()
    return tuple(h for h in FLResult.read(results).history if h.round <= upto)


def wait_for_nodes(grid: Grid, clients: int, timeout: float = 120.0) -> None:
    """Wait until exactly ``clients`` nodes are connected; refuse a mismatched federation.

    Without this a federation of the wrong size hangs (too few nodes: Flower waits forever) or
    fails obscurely (too many: a node's partition-id has no data).
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        n = len(list(grid.get_node_ids()))
        if n > clients or (n < clients and time.monotonic() > deadline):
            raise ValueError(
                f"run config clients={clients} but {n} SuperNode(s) connected; make them match "
                f"(e.g. flwr run . --federation-config num-supernodes={clients}, or --run-config clients={n})")
        if n == clients:
            return
        time.sleep(0.5)


def node_partitions(grid: Grid, timeout: float = 120.0) -> dict[int, int]:
    """Node id → the partition it serves, asked of every node (a query message): a resumed run's
    node ids are new, its partitions are not."""
    nodes = list(grid.get_node_ids())
    asks = [Message(content=RecordDict({"config": ConfigRecord({"ask": PARTITION_KEY})}),
                    message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    out: dict[int, int] = {}
    for reply in grid.send_and_receive(asks, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} did not say its partition: {reply.error}")
        out[reply.metadata.src_node_id] = int(reply.content["metrics"][PARTITION_KEY])
    if sorted(out) != sorted(nodes):
        raise RuntimeError(f"only {len(out)} of {len(nodes)} nodes said their partition within {timeout:g} s")
    return out


def _restore_by_node(grid: Grid, states: Mapping[int, Mapping[str, Any]]) -> dict[int, ArrayRecord]:
    """The checkpoint's client states (by partition) addressed to this run's nodes."""
    by_node = {}
    for node, pid in node_partitions(grid).items():
        if pid in states:
            by_node[node] = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v.numpy()))
                                                    for k, v in states[pid].items()})
        else:
            log.warning("the checkpoint holds no state for partition %d: that client starts afresh", pid)
    return by_node


def run_server(grid: Grid, cfg: FLConfig) -> FLResult:
    """Run ``cfg.rounds`` rounds (minus those a resumed checkpoint already did); return results."""
    import torch

    from core.fraug import make_generator

    torch.set_num_threads(cfg.threads)
    out = output_dir(cfg)
    model = build_model(cfg)
    generator = make_generator(cfg.seed, model.embedding_dim, model.num_classes, cfg.fraug_latent_dim) \
        if cfg.strategy == "fraug" else None
    start_round: int = 0
    history: tuple[RoundRecord, ...] = ()
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        model.load_state_dict(ckpt.model)
        if generator is not None:
            if ckpt.generator is None:
                raise ValueError(f"{cfg.resume}: checkpoint has no generator; cannot resume FRAug from it")
            generator.load_state_dict(ckpt.generator)
        start_round = ckpt.round
        history = _previous_history(Path(cfg.resume), start_round)
        log.info("resuming from %s at round %d", cfg.resume, start_round)
        if not ckpt.client_state:
            log.warning("%s holds no client states (an older checkpoint): the clients' local state restarts "
                        "fresh, so this run will not equal an uninterrupted one", cfg.resume)
    end = min(cfg.rounds, cfg.stop_at) if cfg.stop_at else cfg.rounds
    remaining = end - start_round
    if remaining < 1:
        raise ValueError(f"checkpoint is at round {start_round}; rounds={cfg.rounds}, stop-at={cfg.stop_at} "
                         "leave nothing to run")

    wait_for_nodes(grid, cfg.clients)
    recorder = RunRecorder(out, cfg, start_round=start_round, previous_history=history)
    full_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_round_end(end: RoundEnd) -> None:
        if end.checkpoint:
            state = {**full_state, **end.arrays.to_torch_state_dict()}
            save_checkpoint(out / CHECKPOINT_FILE, Checkpoint(
                model=state, generator=end.generator.to_torch_state_dict() if end.generator is not None else None,
                round=end.round, config=cfg.to_run_config(),
                deploy_norm=end.deploy_norm.to_torch_state_dict() if end.deploy_norm is not None else None,
                client_norm={pid: {k: torch.from_numpy(np.array(v)) for k, v in norm.items()}
                             for pid, norm in end.client_norm.items()} or None,
                client_state={pid: {k: torch.from_numpy(np.array(v.numpy())) for k, v in rec.items()}
                              for pid, rec in end.client_state.items()} or None))
        recorder.write_results()

    strategy = make_strategy(
        cfg.strategy, num_clients=cfg.clients, local_keys=local_key_filter(model, cfg),
        proximal_mu=cfg.proximal_mu,
        generator=ArrayRecord(torch_state_dict=generator.state_dict()) if generator is not None else None,
        recorder=recorder, round_offset=start_round, on_round_end=on_round_end,
        checkpoint_every=cfg.checkpoint_every, last_round=remaining, min_clients=cfg.min_clients,
        max_update_jump=cfg.max_update_jump,
        restore=_restore_by_node(grid, ckpt.client_state) if cfg.resume and ckpt.client_state else None)
    if cfg.resume and ckpt.client_norm:  # a client missing from the next round keeps its layers
        strategy.client_norm.update({pid: {k: v.numpy() for k, v in norm.items()}
                                     for pid, norm in ckpt.client_norm.items()})
    log.info("%s: %d rounds (from %d), %d clients, output %s", cfg.run_name, remaining, start_round,
             cfg.clients, out.resolve())
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=full_state), num_rounds=remaining,
                       timeout=cfg.round_timeout_s)
    finally:
        path = recorder.write_results()
        recorder.close()
    results = FLResult.read(path)
    log.info("%s finished: mean accuracy %s; results in %s", cfg.run_name,
             f"{results.mean_accuracy:.4f}" if results.mean_accuracy is not None else "n/a", path)
    return results


def make_server_app(overrides: Mapping[str, Any] | None = None, *,
                    link: ServerThreadLink | None = None) -> ServerApp:
    """A ServerApp whose config is the run config with ``overrides`` on top; with ``link``, it
    stops waiting for replies once its launcher says the runtime is done (:class:`ServerThreadLink`)."""
    fixed = dict(overrides or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        poll_replies_often(grid)
        if link is not None:
            link.entered()
            stop_polling_when(grid, link.runtime_done)
        run_server(grid, FLConfig.from_run_config({**context.run_config, **fixed}))

    return server_app


app = make_server_app()
