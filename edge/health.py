"""The edge's health signal: a small JSON state file the running node rewrites, and its reader.

Why a file: a board's supervisor (systemd, a container runtime, a person over ssh) can ask "is
this edge well?" without a port, a client library or the edge's cooperation; ``fedshift edge
status`` reads it and answers in one line and an exit code. The node writes it atomically
(temporary file + rename), so a reader never sees half of one, every ``state_every_s`` seconds
and when it stops.

Rules of :func:`problems` (what "unhealthy" means):

- the file is older than ``max_age_s`` (the edge is stuck or dead; a stopped edge says so);
- the cloud is unreachable or refusing uploads (the sender is in an outage);
- the upload buffer is over ``buffer_warn`` of its bound (uploads will soon be dropped);
- no update applied in ``max_age_s`` while uploads were acknowledged (the subscription is stuck).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SCHEMA = "fedshift.edge-state/1"


@dataclass(frozen=True)
class EdgeState:
    """What the node reports about itself (times are Unix seconds)."""

    edge_id: str
    pid: int
    written_unix: float
    started_unix: float
    running: bool  # False: the node stopped (the last write)
    server: str | None
    seen: int = 0
    kept: int = 0
    uploaded: int = 0
    version: int = 0  # the parameter version in force
    last_version_unix: float | None = None  # when a newer version was last put in force
    last_upload_unix: float | None = None  # the newest acknowledged upload
    cloud_reachable: bool | None = None  # None: no cloud (forward-only)
    buffered_samples: int = 0
    buffer_bound: int = 0
    dropped: int = 0
    failed: int = 0

    @property
    def buffer_fill(self) -> float:
        return self.buffered_samples / self.buffer_bound if self.buffer_bound else 0.0


def write_state(path: str | os.PathLike, state: EdgeState) -> None:
    """Replace the state file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"schema": SCHEMA, **asdict(state)}, indent=1))
    os.replace(tmp, path)


def read_state(path: str | os.PathLike) -> EdgeState:
    """The state a node wrote; a missing or foreign file raises with what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no edge state file at {path}: is the edge running with this state_file?")
    data = json.loads(path.read_text())
    if data.pop("schema", None) != SCHEMA:
        raise ValueError(f"{path} is not an edge state file ({SCHEMA})")
    known = {f.name for f in fields(EdgeState)}
    return EdgeState(**{k: v for k, v in data.items() if k in known})


def problems(state: EdgeState, *, now: float | None = None, max_age_s: float = 60.0,
             buffer_warn: float = 0.8) -> list[str]:
    """What is wrong with an edge, one line each (empty: healthy); the rules are the module's."""
    now = time.time() if now is None else now
    out = []
    age = now - state.written_unix
    if not state.running:
        out.append(f"the edge stopped {age:.0f} s ago")
    elif age > max_age_s:
        out.append(f"the state file is {age:.0f} s old (more than {max_age_s:.0f} s): the edge is stuck or dead")
    if state.cloud_reachable is False:
        out.append(f"the cloud {state.server} is unreachable or refusing uploads; {state.buffered_samples} samples "
                   "are buffered")
    if state.buffer_bound and state.buffer_fill > buffer_warn:
        out.append(f"the upload buffer is {100 * state.buffer_fill:.0f}% full: the oldest uploads will be dropped")
    last_update = state.last_version_unix or state.started_unix
    if state.running and state.last_upload_unix and state.last_upload_unix - last_update > max_age_s:
        out.append(f"no parameter update for {now - last_update:.0f} s although uploads are acknowledged: the "
                   "subscription may be stuck")
    return out
