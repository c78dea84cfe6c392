"""What every resumable study here shares: one JSON per finished cell, written atomically, read
back keyed by the cell's ``key``; a loop in which one failed cell is logged and skipped, not the
end of hours of study; and a SIGTERM that unwinds like Ctrl-C, so a stopped study stops the
processes its cell started instead of orphaning them."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

log = logging.getLogger("bench.study_cells")


class HasKey(Protocol):
    @property
    def key(self) -> str: ...


def load_done(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Every finished cell in ``out_dir``, by key."""
    cells = (json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")))
    return {cell["key"]: cell for cell in cells}


def save_cell(out_dir: Path, key: str, result: dict[str, Any]) -> Path:
    """Write one finished cell (tmp + rename: a stop never leaves half a file)."""
    path = out_dir / f"{key}.json"
    tmp = out_dir / f".{key}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def run_cells(todo: Sequence[HasKey], run_one: Callable[[Any], dict[str, Any]], out_dir: Path,
              done: dict[str, dict[str, Any]], describe: Callable[[Any, dict[str, Any]], str],
              before_each: Callable[[], None] | None = None) -> list[str]:
    """Run each cell in turn, saving (and adding to ``done``) each as it finishes.

    A cell that raises is logged with its traceback and skipped: the cells after it still run, and
    the next invocation retries it (it is not saved). Ctrl-C and SIGTERM still stop the loop.
    Returns the keys of the cells that failed."""
    failed: list[str] = []
    for i, cell in enumerate(todo, 1):
        if before_each is not None:
            before_each()
        t0 = time.monotonic()
        try:
            result = run_one(cell)
        except Exception:  # noqa: BLE001 - one cell's failure, logged in full; the study goes on
            log.exception("[%d/%d] %s failed; skipped (rerun the study to retry it)", i, len(todo), cell.key)
            failed.append(cell.key)
            continue
        done[cell.key] = result
        save_cell(out_dir, cell.key, result)
        log.info("[%d/%d] %s: %s in %.0f s", i, len(todo), cell.key, describe(cell, result), time.monotonic() - t0)
    if failed:
        log.error("%d of %d cells failed: %s", len(failed), len(todo), ", ".join(failed))
    return failed


def unwind_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
