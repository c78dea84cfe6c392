"""When the cloud writes its state down: the journal record of every acknowledged change, the
snapshots that bound the journal, and the thread that takes them (the files are
:mod:`server.checkpoint`'s; what the state *is* is the service's, given as a ``capture`` function).

Rules (the reasons are in :mod:`server.checkpoint`):

- every change is journalled under :attr:`Durability.lock` *before* it is acknowledged; a
  snapshot holds the same lock while it captures the state and rotates the journal, so a record
  is either in the snapshot's state or after it;
- a snapshot is taken every ``every_s`` while anything changed (journal records or publications),
  after a restore, and at shutdown (``final``);
- without a directory nothing is written and every call is a cheap no-op, so callers never check.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from protos.fedshift.v1 import edge_pb2 as pb
from server.checkpoint import Journal, Kind, remove_journals_before, write_snapshot

log = logging.getLogger(__name__)

Capture = Callable[[bool], dict[str, Any]]  # final -> the service state (called with ``lock`` held)


class Durability:
    """The journal and snapshots of one cloud process; ``directory`` ``None``: not durable."""

    def __init__(self, directory: Path | None, *, every_s: float = 0.0, fsync: bool = False) -> None:
        self.directory, self.every_s, self.fsync = directory, every_s, fsync
        self.lock = threading.Lock()  # every journalled change and every snapshot's capture
        self._journal: Journal | None = None
        self._snapshot_lock = threading.Lock()  # one snapshot at a time
        self._counts = threading.Lock()
        self._changes = 0  # state changes (journal records, publications) since the last snapshot
        self.checkpoints = 0
        self._periodic: threading.Thread | None = None
        self._periodic_stop = threading.Event()

    @property
    def enabled(self) -> bool:
        """True once the journal is open (after the restore)."""
        return self._journal is not None

    def open(self, generation: int) -> None:
        """Start journalling into ``generation`` (the restore read every older one)."""
        assert self.directory is not None
        self._journal = Journal(self.directory, generation, fsync=self.fsync)

    # ---------------------------------------------------------------- records

    def record(self, kind: Kind, value: dict[str, Any]) -> None:
        """Journal a JSON state change (caller holds :attr:`lock`)."""
        if self._journal is not None:
            self._journal.append_json(kind, value)
            self.changed()

    def record_upload(self, request: pb.UploadRequest) -> None:
        """Journal an accepted upload, its auth token cleared: secrets never reach the disk."""
        if self._journal is not None:
            record = pb.UploadRequest()
            record.CopyFrom(request)
            record.auth_token = ""
            self._journal.append(Kind.UPLOAD, record.SerializeToString())
            self.changed()

    def changed(self) -> None:
        """Count a change that the next periodic snapshot must cover (a publication, say)."""
        with self._counts:
            self._changes += 1

    # ---------------------------------------------------------------- snapshots

    def snapshot(self, capture: Capture, final: bool = False) -> Path | None:
        """Write the captured state and drop the journal it covers; ``None`` when not durable."""
        if self._journal is None or self.directory is None:
            return None
        with self._snapshot_lock:
            t0 = time.perf_counter()
            with self.lock:
                state = capture(final)
                with self._counts:
                    self._changes = 0
                generation = self._journal.rotate()
            state["journal_generation"] = generation
            path = write_snapshot(self.directory, state)
            remove_journals_before(self.directory, generation)
            self.checkpoints += 1
        log.info("checkpoint %d: %d edges, %d learners, %.0f ms (%s)", self.checkpoints, len(state.get("edges", ())),
                 len(state.get("slots", ())), 1000 * (time.perf_counter() - t0), path)
        return path

    def start_periodic(self, capture: Capture) -> None:
        """Snapshot every ``every_s`` while anything changed (bounds the journal's length)."""
        if self._journal is None or self.every_s <= 0 or self._periodic is not None:
            return
        self._periodic = threading.Thread(target=self._loop, args=(capture,), name="cloud-checkpoint", daemon=True)
        self._periodic.start()

    def _loop(self, capture: Capture) -> None:
        while not self._periodic_stop.wait(self.every_s):
            with self._counts:
                changed = self._changes
            if changed:
                try:
                    self.snapshot(capture)
                except Exception:  # the journal still holds everything; retried next time
                    log.exception("checkpoint failed (the journal keeps every change; retrying in %.0f s)",
                                  self.every_s)

    def stop_periodic(self) -> None:
        self._periodic_stop.set()
        if self._periodic is not None:
            self._periodic.join()
            self._periodic = None

    def close(self, capture: Capture) -> None:
        """Stop the periodic snapshots, take the final one and close the journal (shutdown)."""
        self.stop_periodic()
        if self._journal is None:
            return
        try:
            self.snapshot(capture, final=True)
        finally:
            self._journal.close()
            self._journal = None
