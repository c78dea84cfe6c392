"""``fedshift edge``: run one forward-only edge node against a cloud (or none); ``fedshift edge
check`` tries the setup once (:mod:`edge.check`); ``fedshift edge status`` reads a running edge's
state file (:mod:`edge.health`).

Settings come from ``--config edge.toml`` and flags (:class:`edge.config.EdgeConfig`). Everything
heavy is imported inside :func:`run`, so the dispatcher stays instant. SIGTERM and Ctrl-C stop
the node at the next batch boundary (at once if it is waiting for input), flush the upload buffer
(up to ``node.flush_timeout_s``), stop the subscriber, close the channel and write the summary;
the exit status is then 0 and the summary says ``stopped_early``. A run that fails once the node is running still writes its summary, with
``error`` set; a model, source or setting that cannot be opened is reported at once (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from dataclasses import replace

from edge.config import EdgeConfig
from protos.contract import token_or_env
from edge.logs import configure_logging
from edge.sources import SOURCE_HELP
from protos.config import add_config_flags, resolve_or_print

log = logging.getLogger("edge")

DESCRIPTION = ("Run a forward-only edge node: predict each batch with the ONNX model, upload the samples "
               "that pass the entropy filters, apply the cloud's normalization updates as they arrive. "
               "Settings: --config FILE and/or the flags below (flags win); --print-config shows the result.")


ACTIONS = ("run", "check", "status")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = textwrap.fill(DESCRIPTION + " `fedshift edge check --config FILE` tries every part of the "
                                       "setup once and says what to fix; `fedshift edge status --config FILE` reads "
                                       "the running edge's state file (exit 0: healthy).", 79)
    parser.epilog = SOURCE_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the sources' table as written
    parser.add_argument("action", nargs="?", choices=ACTIONS, default="run",
                        help="run (default) the edge; check its setup; or show a running edge's status")
    parser.add_argument("--max-age", type=float, default=60.0, metavar="S",
                        help="status: a state file older than this means the edge is stuck (default 60)")
    add_config_flags(parser, EdgeConfig, title="edge")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_or_print(EdgeConfig, args)
    if cfg is None:
        return 0
    configure_logging("debug" if getattr(args, "verbose", False) else cfg.log_level, cfg.log_format)
    if args.action == "check":
        return run_check(cfg)
    if args.action == "status":
        return show_status(cfg, args.max_age)
    if missing := cfg.missing():
        raise ValueError(f"missing setting(s) {', '.join(missing)}: give --{missing[0]} or set it in --config")
    return run_edge(cfg)


def run_check(cfg: EdgeConfig) -> int:
    """Print one line per part of the setup; 0 when every part is ok."""
    from edge.check import check

    findings = check(cfg)
    for finding in findings:
        print(finding.line())
    bad = sum(not f.ok for f in findings)
    print(f"{bad} problem(s)" if bad else "the setup works", flush=True)
    return 1 if bad else 0


def show_status(cfg: EdgeConfig, max_age_s: float) -> int:
    """One line of status and one per problem; 0 healthy, 1 not, 2 no state file."""
    from edge.health import problems, read_state

    if not cfg.node.state_file:
        print("fedshift edge status: no state_file in the config ([node] state_file = ...)", file=sys.stderr)
        return 2
    try:
        state = read_state(cfg.node.state_file)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedshift edge status: {exc}", file=sys.stderr)
        return 2
    found = problems(state, max_age_s=max_age_s)
    cloud = {None: "no cloud", True: "reachable", False: "UNREACHABLE"}[state.cloud_reachable]
    print(f"edge {state.edge_id} (pid {state.pid}) {'running' if state.running else 'stopped'}: version "
          f"{state.version}, seen {state.seen}, uploaded {state.uploaded}, cloud {cloud}, buffer "
          f"{state.buffered_samples}/{state.buffer_bound}, state {time.time() - state.written_unix:.0f} s old")
    for line in found:
        print(f"problem: {line}")
    return 1 if found else 0


def run_edge(cfg: EdgeConfig) -> int:
    """Run one edge with resolved settings; returns the exit status."""
    from edge.client import CloudClient, RetryPolicy
    from edge.node import EdgeNode
    from edge.runtime import EdgeRuntime
    from edge.selection import EntropySelector
    from edge.sources import open_source

    stop_event = threading.Event()  # the node's stop; it also ends the live sources (watch, camera)
    try:
        runtime = EdgeRuntime(cfg.model, threads=cfg.threads, providers=cfg.providers)
        selection = cfg.selection.for_classes(runtime.num_classes)
        source = open_source(cfg.source, cfg.batch_size, runtime.input_shape, runtime.class_names,
                             stop=stop_event, poll_s=cfg.watch_poll_s)
    except ImportError as exc:
        print(f"fedshift edge: error: {exc}", file=sys.stderr)
        return 2
    edge_id = cfg.edge_id or f"{socket.gethostname()}-{os.getpid()}"
    client = None
    if cfg.with_cloud:
        try:
            credentials = cfg.channel_credentials()
        except (ValueError, OSError) as exc:
            print(f"fedshift edge: error: {exc}", file=sys.stderr)
            return 2
        if credentials is None:
            log.warning("INSECURE: edge %s talks plaintext gRPC to %s (--insecure)", edge_id, cfg.server)
        client = CloudClient(cfg.server, edge_id, token_or_env(cfg.token), cfg.timeout_s,
                             connect_timeout=cfg.connect_timeout_s, retry=RetryPolicy(), seed=cfg.seed,
                             sleep=stop_event.wait, credentials=credentials)
    node = EdgeNode(runtime, source, client, EntropySelector(selection), config=cfg.node, edge_id=edge_id,
                    stop_event=stop_event)
    log.info("edge %s: model %s (%d classes), source %s, method %s, server %s", edge_id,
             runtime.model_name or cfg.model, runtime.num_classes, cfg.source, selection.method, cfg.server)
    previous = _install_signal_handlers(node)
    status = 0
    try:
        summary = node.run()
    except Exception as exc:  # noqa: BLE001 - reported in the summary and the exit status
        log.error("edge %s failed: %s", edge_id, exc)
        summary = replace(node.summary(), error=f"{type(exc).__name__}: {exc}")
        status = 1
    finally:
        _restore_signal_handlers(previous)
        if client is not None:
            client.close()
        runtime.close()  # a session build in progress finishes first: nothing runs in ORT at exit
    if cfg.out:
        summary.write(cfg.out)
        log.info("summary written to %s", cfg.out)
    return status


def _install_signal_handlers(node) -> dict:
    """SIGTERM/SIGINT: graceful stop; interrupt at once only when blocked reading input."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, _frame) -> None:
        log.warning("signal %d: stopping after the current batch", signum)
        node.stop()
        if node.waiting_for_input:
            raise KeyboardInterrupt

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
