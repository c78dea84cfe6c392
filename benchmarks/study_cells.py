"""What every resumable study here shares: one JSON per finished cell, written atomically, read
back keyed by the cell's ``key``; and a SIGTERM that unwinds like Ctrl-C, so a stopped study
stops the processes its cell started instead of orphaning them."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any


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


def unwind_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
