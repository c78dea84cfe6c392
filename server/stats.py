"""What the cloud reports: :class:`CloudStats`, written to ``OUT/cloud/stats.json`` at shutdown.

A type, not a dict, so readers (the launcher, the report, tests) cannot misspell a counter into a
silent zero; the invariants are checked when it is built or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.records import Record


@dataclass(frozen=True)
class EdgeStats:
    """One registered edge as the cloud saw it."""

    uploads: int = 0  # accepted requests of the current episodes (duplicates and stale ones excluded)
    samples: int = 0  # samples of those requests, queued for the learner
    duplicates: int = 0  # re-sent sequences answered as duplicates
    stale_samples: int = 0  # samples of past episodes: acknowledged, not learned from
    seen: int = 0  # the edge's own count of samples it has predicted (from its uploads)
    episode: int = 0
    learner: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # the edge's last ReportMetrics values

    def __post_init__(self) -> None:
        if min(self.uploads, self.samples, self.duplicates, self.stale_samples, self.seen) < 0:
            raise ValueError(f"negative counter in {self}")
        if self.samples < self.uploads:
            raise ValueError(f"{self.uploads} uploads cannot hold {self.samples} samples")


@dataclass(frozen=True)
class LearnerStats:
    version: int = 0
    steps: int = 0
    episode: int = 0
    errors: int = 0
    queue: int = 0
    replay: int = 0
    learned_samples: int = 0  # samples handed to the learner (accepted ones of its current episodes)
    pending_samples: int = 0  # accepted samples not yet handed to it (a shutdown's snapshot keeps them)


@dataclass(frozen=True)
class CloudStats(Record):
    SCHEMA = "fedshift.cloud-stats/1"

    edges: dict[str, EdgeStats] = field(default_factory=dict)
    learners: dict[str, LearnerStats] = field(default_factory=dict)
    uptime_s: float = 0.0
    versions_published: int = 0
    uploads: int = 0
    samples: int = 0
    checkpoints: int = 0  # snapshots this process wrote (checkpoint_dir)
    restored_records: int = 0  # journal records replayed at start (0: a fresh start or a clean shutdown)

    def __post_init__(self) -> None:
        if sum(e.uploads for e in self.edges.values()) != self.uploads:
            raise ValueError(f"uploads {self.uploads} != the edges' sum")
        if sum(e.samples for e in self.edges.values()) != self.samples:
            raise ValueError(f"samples {self.samples} != the edges' sum")
        if unknown := {e.learner for e in self.edges.values()} - set(self.learners):
            raise ValueError(f"edges name unknown learners {sorted(unknown)}")
