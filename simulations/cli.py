"""fedshift: learning under distribution shift across a cloud, federated clients and edge devices.

Run the whole system on one machine (`fedshift run`), or each role on its own: federated training
(`fedshift fl`), ONNX export (`fedshift export`), the adaptation cloud (`fedshift cloud`), a
forward-only edge (`fedshift edge`), both on loopback (`fedshift adapt`). `fedshift COMMAND --help`
lists each command's settings; roles read them from `--config FILE` and flags.
"""

# How it dispatches: each subcommand module has ``configure(parser)`` and ``run(args)``; only the
# chosen command's module is imported and configured, so `fedshift edge` keeps working on an
# edge-only install (no torch).

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from typing import Sequence

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("simulations.commands.data", "built-in data: preview the digits-shift or glyph-shift domains and the corruptions"),
    "run": ("simulations.commands.run", "the whole system: data -> FL -> export -> cloud + edges -> report"),
    "report": ("simulations.commands.report", "rebuild report.md and plots from a run folder"),
    "adapt": ("simulations.commands.adapt", "cloud + N edge processes on loopback: one CEMA-family method, or --compare"),
    "export": ("simulations.commands.export", "export a registry model to ONNX with live-swappable normalization"),
    "cloud": ("server.cloud_cli", "serve CEMA cloud-edge adaptation (gRPC) to forward-only edges"),
    "edge": ("edge.cli", "run a forward-only edge node (ONNX Runtime) against a cloud, or none"),
    "fl": ("simulations.commands.fl", "federated training on Flower (FedAvg, FedProx, FedBN, local-only, FRAug); compare"),
    "certs": ("simulations.commands.certs", "write a test CA, a server certificate and edge client certificates"),
    "creds": ("simulations.commands.creds", "add / revoke / list per-edge credentials in the cloud's credentials file"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported and configured (all of them when None)."""
    parser = argparse.ArgumentParser(prog="fedshift", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            mod = importlib.import_module(module)
            mod.configure(sp)
            sp.set_defaults(_run=mod.run)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one)."""
    return next((a for a in argv if a in COMMANDS), None)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds `finally` blocks and atexit hooks (Ray's shutdown among them); the
    # default SIGTERM action would kill the process without either
    sys.exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    args = build_parser(command or "").parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"fedshift {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
