"""Where built-in artefacts are cached on disk, and how two processes share one safely.

Rendered data sets (core.data) and trained built-in models (core.teacher) live in one folder:
the argument, else ``$FEDSHIFT_CACHE``, else ``~/.cache/fedshift``. It is defined here, in the
torch-free data package, because core.teacher imports core.data (never the other way round).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_ENV = "FEDSHIFT_CACHE"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where trained built-ins live: the argument, else ``$FEDSHIFT_CACHE``, else ~/.cache/fedshift."""
    if path is None:
        path = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedshift"
    return Path(path).expanduser()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if missing), so that concurrent processes
    build a missing artefact once and never read a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it over `path`: a
    reader sees the old file or the whole new one, never a partial one. `suffix` is the
    temporary name's ending, for writers that insist on one (np.savez adds '.npz')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}",
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
