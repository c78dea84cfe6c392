"""The cloud's durable state: a snapshot plus a journal of every change since, so that a cloud
killed at any moment (``kill -9`` included) restarts with every upload it acknowledged.

Why a journal and not only snapshots: an upload is acknowledged only after its record is in the
journal, so nothing an edge was told "received" can be lost between two snapshots; snapshots
(every ``checkpoint_every_s`` while anything changed, after a restore, and at shutdown) bound the
journal's length and so the replay time of a restart. What the cloud learnt from journalled
uploads after the last snapshot is not saved: the restart learns from them again.

Layout of the checkpoint folder::

    snapshot.pt            the service state (``torch.save``, loadable with ``weights_only``); written
                           to a temporary file, fsync'd, then renamed over the old one
    journal-00000007.log   records of generation 7: ``[u32 length][u32 crc32][u8 kind][payload]``

Rules:

- a snapshot names the first journal generation it does not cover; a restart loads the snapshot
  (if any) and replays the records of that generation and every later one, in order; journals of
  older generations are deleted once a newer snapshot is in place;
- the journal rotates to a new generation at each snapshot, under the same lock that holds every
  state change, so a record is either in the snapshot's state or after it, never both;
- a record whose length or checksum does not match (a write torn by the process's death) ends its
  file: the request it belonged to was never acknowledged, and its edge re-sends it;
- records are written to the operating system before the reply (a killed process loses none);
  ``journal_fsync`` also forces them to the disk before the reply (a power loss loses none), at the
  cost of one fsync per state change;
- versions never go backwards at an edge: a learner's versions are reserved in blocks
  (:data:`VERSION_BLOCK`) by a ceiling record written *before* the first version of a block is
  published, and a restored learner resumes above its last ceiling.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
import zlib
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

SNAPSHOT = "snapshot.pt"
FORMAT = 1
VERSION_BLOCK = 1024  # versions a learner may publish per ceiling record
_HEADER = struct.Struct("<II")  # length of kind + payload, crc32 of kind + payload
_MAX_RECORD = 1 << 30
_JOURNAL = re.compile(r"^journal-(\d{8})\.log$")


class Kind(IntEnum):
    """What a journal record holds."""

    REGISTER = 1  # JSON {edge_id, model_id, model_sha256}: an edge joined or changed its model file
    UPLOAD = 2  # a serialized UploadRequest (auth token cleared) the cloud accepted
    RESET = 3  # JSON {edge_id, episode}: an edge started an episode
    CEILING = 4  # JSON {slot, version}: the learner may publish versions up to this one


def journal_path(directory: Path, generation: int) -> Path:
    return directory / f"journal-{generation:08d}.log"


def journal_generations(directory: Path) -> list[int]:
    """The generations of the journal files in ``directory``, ascending."""
    found = (_JOURNAL.match(p.name) for p in directory.iterdir()) if directory.is_dir() else ()
    return sorted(int(m.group(1)) for m in found if m)


class Journal:
    """The append-only journal of one cloud process (thread-safe)."""

    def __init__(self, directory: Path, generation: int, *, fsync: bool = False) -> None:
        self.directory, self.fsync = Path(directory), bool(fsync)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._generation = int(generation)
        self._file = open(journal_path(self.directory, self._generation), "ab")  # noqa: SIM115 - kept open
        self.records = 0  # appended since the last rotation

    @property
    def generation(self) -> int:
        return self._generation

    def append(self, kind: Kind, payload: bytes) -> None:
        """Write one record (and fsync it when asked) before the caller acknowledges anything."""
        body = bytes((int(kind),)) + payload
        with self._lock:
            self._file.write(_HEADER.pack(len(body), zlib.crc32(body)) + body)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self.records += 1

    def append_json(self, kind: Kind, value: dict[str, Any]) -> None:
        self.append(kind, json.dumps(value, sort_keys=True).encode())

    def rotate(self) -> int:
        """Close this generation and start the next; returns the new generation."""
        with self._lock:
            self._file.close()
            self._generation += 1
            self._file = open(journal_path(self.directory, self._generation), "ab")  # noqa: SIM115
            self.records = 0
            return self._generation

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_journal(directory: Path, first_generation: int) -> Iterator[tuple[Kind, bytes]]:
    """Every intact record of ``first_generation`` and later, in order; a torn tail is skipped with
    a warning (its request was never acknowledged)."""
    for gen in journal_generations(directory):
        if gen < first_generation:
            continue
        data = journal_path(directory, gen).read_bytes()
        pos = 0
        while pos < len(data):
            if pos + _HEADER.size > len(data):
                log.warning("journal %d: torn record header at byte %d (dropped)", gen, pos)
                break
            length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size:pos + _HEADER.size + length]
            if not 1 <= length <= _MAX_RECORD or len(body) != length or zlib.crc32(body) != crc:
                log.warning("journal %d: torn or corrupt record at byte %d (dropped with the rest of the file)",
                            gen, pos)
                break
            pos += _HEADER.size + length
            try:
                kind = Kind(body[0])
            except ValueError:
                log.warning("journal %d: unknown record kind %d at byte %d (skipped)", gen, body[0], pos)
                continue
            yield kind, body[1:]


def write_snapshot(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically: a reader sees the old snapshot or the new one, never half of one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path, tmp = directory / SNAPSHOT, directory / (SNAPSHOT + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)
    return path


def read_snapshot(directory: Path) -> dict[str, Any] | None:
    """The snapshot in ``directory`` (``None``: there is none)."""
    path = Path(directory) / SNAPSHOT
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: snapshot format {state.get('format')!r}, this cloud reads {FORMAT}")
    return state


def remove_journals_before(directory: Path, generation: int) -> None:
    """Delete the journal files a snapshot covers."""
    for gen in journal_generations(directory):
        if gen < generation:
            journal_path(directory, gen).unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
