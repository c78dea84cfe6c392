"""``watch:DIR``: image files as they arrive in a folder (a camera daemon's drop folder), each once.

The rules, and why:

- **Which files.** Image files (:data:`edge.images.IMAGE_SUFFIXES`) directly in DIR (not in
  sub-folders), those already there at start included (so nothing written while the edge was
  starting is missed). Names starting with ``.`` are ignored: a writer that pauses while writing
  should write ``.name.png`` (or any non-image suffix, e.g. ``name.png.part``) and rename it into
  place, which is atomic.
- **Never half-written.** The folder is looked at every ``poll_s`` seconds; a file is read once
  its size (non-zero) and modification time are the same at two looks in a row. A writer that
  keeps writing is therefore never read in the middle; one that stalls longer than ``poll_s``
  mid-file must use the rename above. A file that still cannot be decoded is logged and skipped,
  and tried again only if its size or time change later (a slow writer finished it).
- **Each once, in arrival order.** A file is known by its name and inode and read once: changing
  a read file in place does not make it new, renaming a new file over it does (so a daemon that
  keeps replacing ``latest.jpg`` by renames is followed). A file no longer in the folder at a look
  is forgotten, so memory is bounded by what the folder holds. Files are read in the order they
  became complete; those that did at the same look by modification time, then name.
- **Batches.** Each look yields what became complete, in batches of up to ``batch_size``: a live
  source does not hold files back to fill a batch. Unlabelled, one segment named after the
  folder, severity 0, reset at the first batch only.
- **End.** Only when stopped: the node's stop event (SIGTERM, Ctrl-C, ``fedshift edge`` ending)
  or the node's ``limit``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edge.images import IMAGE_SUFFIXES, InputSize, read_image, require_pillow
from edge.sources import EdgeBatch, check_batch_size

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (name, inode)
Signature = tuple[int, int]  # (size, mtime_ns)


@dataclass(frozen=True)
class Arrival:
    """A file that became complete at one look."""

    path: Path
    key: Key
    signature: Signature


class WatchSource:
    """Image files arriving in ``directory``; the module docstring has the rules."""

    def __init__(self, directory: str | os.PathLike, batch_size: int, image_size: int | Sequence[int],
                 *, channels: int = 3, poll_s: float = 0.5, stop: threading.Event | None = None) -> None:
        require_pillow()
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"watched folder not found: {self.directory}")
        self.batch_size = check_batch_size(batch_size)
        self.size = InputSize.of(image_size, channels)
        if not poll_s > 0:
            raise ValueError(f"the watch poll interval must be > 0 seconds, got {poll_s}")
        self.poll_s = float(poll_s)
        self.stop = stop
        self._last_look: dict[Key, Signature] = {}  # not read yet: the signature at the last look
        self._read: dict[Key, Signature | None] = {}  # read (None), or unreadable with this signature
        self.files_read = 0
        self.files_unreadable = 0
        log.info("watching %s for images every %.2f s", self.directory, self.poll_s)

    def poll(self) -> list[Arrival]:
        """One look at the folder: the files that became complete since the last look, in order."""
        ready: list[tuple[int, str, Arrival]] = []
        present: set[Key] = set()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    if not entry.is_file():
                        continue
                    key = (entry.name, entry.inode())
                    present.add(key)
                    if key in self._read and self._read[key] is None:
                        continue  # read once: never again
                    st = entry.stat()
                except FileNotFoundError:  # gone between the listing and the look
                    continue
                signature = (st.st_size, st.st_mtime_ns)
                if self._read.get(key) == signature:
                    continue  # unreadable, and unchanged since
                if st.st_size > 0 and self._last_look.get(key) == signature:
                    ready.append((st.st_mtime_ns, entry.name, Arrival(Path(entry.path), key, signature)))
                else:
                    self._last_look[key] = signature
        for table in (self._last_look, self._read):  # forget names that left the folder
            for key in [k for k in table if k not in present]:
                del table[key]
        ready.sort(key=lambda r: r[:2])
        for *_, arrival in ready:
            del self._last_look[arrival.key]
        return [arrival for *_, arrival in ready]

    def _take(self, arrival: Arrival) -> np.ndarray | None:
        """Read one complete file; None (logged, to be retried if it changes) when it cannot be decoded."""
        try:
            image = read_image(arrival.path, self.size)
        except ValueError as exc:
            self._read[arrival.key] = arrival.signature
            self.files_unreadable += 1
            log.warning("watch: skipped %s (retried if it changes): %s", arrival.path.name, exc)
            return None
        self._read[arrival.key] = None
        self.files_read += 1
        return image

    def _wait(self) -> bool:
        """Sleep one poll interval; True when asked to stop."""
        if self.stop is None:
            time.sleep(self.poll_s)
            return False
        return self.stop.wait(self.poll_s)

    def __iter__(self) -> Iterator[EdgeBatch]:
        name = self.directory.name or "watch"
        first = True
        while self.stop is None or not self.stop.is_set():
            arrivals = self.poll()
            for lo in range(0, len(arrivals), self.batch_size):
                images = [im for a in arrivals[lo:lo + self.batch_size] if (im := self._take(a)) is not None]
                if images:
                    yield EdgeBatch(np.stack(images), None, name, 0, first)
                    first = False
            if self._wait():
                return
