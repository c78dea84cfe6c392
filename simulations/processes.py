"""Child processes that are always stopped: every process a launcher starts, it stops.

Children run in their own session (so a terminal's Ctrl-C reaches only the launcher, which then
stops them in order: SIGTERM, a grace period, SIGKILL for the stubborn) and write their output
to ``<log_dir>/<name>.log``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger(__name__)


def fedshift_argv(*args: str) -> list[str]:
    """Command line running a ``fedshift`` subcommand with this interpreter (no PATH needed)."""
    return [sys.executable, "-m", "simulations.cli", *args]


class ProcessGroup:
    """Start named child processes; ``stop_all`` (or leaving the ``with`` block) ends them all."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, subprocess.Popen] = {}
        self._adopted: list[tuple[str, int]] = []
        self._logs: list = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike | None = None) -> subprocess.Popen:
        if name in self._procs:
            raise ValueError(f"process {name!r} already started")
        logf = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self._logs.append(logf)
        proc = subprocess.Popen(list(argv), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        self._procs[name] = proc
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def adopt(self, name: str, pid: int) -> None:
        """Also stop a process we did not spawn but answer for (e.g. the SuperLink `flwr run` starts)."""
        self._adopted.append((name, pid))

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self._procs.items()}

    def wait(self, names: Sequence[str], timeout: float) -> dict[str, int]:
        """Wait for the named processes to exit; raises TimeoutError naming the ones still running."""
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        for name in names:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                codes[name] = self._procs[name].wait(timeout=remaining)
            except subprocess.TimeoutExpired as exc:
                raise TimeoutError(f"{name} still running after {timeout:.0f} s (log: {self.log_path(name)})") from exc
        return codes

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, name: str, grace: float = 10.0) -> int | None:
        """SIGTERM the child's whole process group (its own helpers — e.g. Ray's — included), wait
        ``grace`` seconds, then SIGKILL whatever of the group is left; returns the exit code."""
        proc = self._procs[name]
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing", name, proc.pid, grace)
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
        if proc.poll() is None:
            proc.wait(timeout=grace)
        return proc.returncode

    def stop_all(self, grace: float = 10.0) -> None:
        for name, pid in reversed(self._adopted):
            _stop_foreign(pid, name, grace)
        for name in reversed(list(self._procs)):  # edges first, the cloud they talk to last
            self.stop(name, grace)
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _signal_group(pgid: int, sig: int) -> None:
    """Children are started as session (and process-group) leaders, so pgid == their pid."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_foreign(pid: int, name: str, grace: float) -> None:
    """SIGTERM, then SIGKILL, the group of a process that is not our child (no Popen to wait on)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    log.warning("%s (pid %d) did not stop", name, pid)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float, what: str) -> str:
    """Poll for a file a child writes when ready (e.g. its bound port), failing fast if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and (text := path.read_text().strip()):
            return text
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
