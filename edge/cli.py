"""``fedshift edge``: run one forward-only edge node against a cloud (or none).

Everything heavy is imported inside :func:`run`, so the dispatcher stays instant. SIGTERM and
Ctrl-C stop the node at the next batch boundary (at once if it is waiting for input), stop the
subscriber, close the channel and write the summary; the exit status is then 0 and the summary
says ``"stopped_early": true``. A failed run still writes its summary, with ``"error"`` set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

log = logging.getLogger("edge")

METHOD_CHOICES = ("cema", "eata", "all", "none", "random")


def _redundancy(text: str) -> float | None:
    if text.lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--redundancy takes a number or 'off', got {text!r}") from exc


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, help="cloud address HOST:PORT, or 'none' to run without a cloud")
    parser.add_argument("--model", required=True, help="the exported edge model (edge.onnx)")
    parser.add_argument("--source", required=True, help="npz:PATH | folder:DIR | stdin:HxWxC")
    parser.add_argument("--edge-id", default=None, help="this edge's id (default: host name and pid)")
    parser.add_argument("--token", default=os.environ.get("FEDSHIFT_TOKEN", ""),
                        help="auth token (default: $FEDSHIFT_TOKEN)")
    sel = parser.add_argument_group("selection (METHODS.md, CEMA)")
    sel.add_argument("--method", choices=METHOD_CHOICES, default="cema")
    sel.add_argument("--lam", type=float, default=1.0, help="λ of the dynamic E_max")
    sel.add_argument("--warmup", type=int, default=128, help="N_w: samples at E_max = E0")
    sel.add_argument("--kappa", type=float, default=0.02, help="E_min = κ·ln C")
    sel.add_argument("--e0-factor", type=float, default=0.4, help="E0 = factor·ln C")
    sel.add_argument("--redundancy", type=_redundancy, default=None, metavar="D|off",
                     help="keep if cos(m, p) < D (default: off)")
    sel.add_argument("--static-threshold", action="store_true", help="ablation: E_max = E0 throughout")
    sel.add_argument("--no-emin", action="store_true", help="ablation: no low-informative floor")
    sel.add_argument("--random-rate", type=float, default=None, help="keep probability for --method random")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="stop after N samples")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-RPC deadline, seconds")
    parser.add_argument("--connect-timeout", type=float, default=60.0,
                        help="how long registration waits for the cloud to come up, seconds")
    parser.add_argument("--metrics-every", type=int, default=20, help="batches between metric reports")
    parser.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--sync", type=float, default=0.0, metavar="SECONDS",
                        help="simulation lockstep: after each upload wait up to SECONDS for the version the ack names "
                             "(pair with `fedshift cloud --lockstep`; default 0: never wait, as deployed)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from edge.client import CloudClient, RetryPolicy
    from edge.node import EdgeNode, NodeConfig
    from edge.runtime import EdgeRuntime
    from edge.selection import EntropySelector, SelectionConfig
    from edge.sources import open_source

    try:
        runtime = EdgeRuntime(args.model, threads=args.threads)
        selection = SelectionConfig(
            num_classes=runtime.num_classes, method=args.method, lam=args.lam, warmup=args.warmup,
            kappa=args.kappa, e0_factor=args.e0_factor, redundancy=args.redundancy,
            dynamic=not args.static_threshold, use_emin=not args.no_emin, random_rate=args.random_rate,
            seed=args.seed,
        )
        source = open_source(args.source, args.batch_size, runtime.input_shape, runtime.class_names)
    except ImportError as exc:
        print(f"fedshift edge: error: {exc}", file=sys.stderr)
        return 2
    edge_id = args.edge_id or f"{socket.gethostname()}-{os.getpid()}"
    stop_event = threading.Event()
    client = None
    if args.server.lower() != "none":
        client = CloudClient(args.server, edge_id, args.token, args.timeout,
                             connect_timeout=args.connect_timeout, retry=RetryPolicy(), seed=args.seed,
                             sleep=stop_event.wait)
    node = EdgeNode(runtime, source, client, EntropySelector(selection),
                    config=NodeConfig(limit=args.limit, metrics_every=args.metrics_every,
                                      log_every_s=args.log_every, edge_id=edge_id,
                                      sync_timeout_s=args.sync),
                    stop_event=stop_event)
    log.info("edge %s: model %s (%d classes), source %s, method %s, server %s", edge_id,
             runtime.model_name or args.model, runtime.num_classes, args.source, args.method, args.server)
    previous = _install_signal_handlers(node)
    status = 0
    try:
        summary = node.run()
    except Exception as exc:  # noqa: BLE001 - reported in the summary and the exit status
        log.error("edge %s failed: %s", edge_id, exc)
        summary = node.summary()
        summary["error"] = f"{type(exc).__name__}: {exc}"
        status = 1
    finally:
        _restore_signal_handlers(previous)
        if client is not None:
            client.close()
    if args.out is not None:
        _write_json(args.out, summary)
        log.info("summary written to %s", args.out)
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


def _write_json(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, allow_nan=False))
    tmp.replace(path)
