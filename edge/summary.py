"""What one edge run reports: :class:`EdgeSummary`, written by ``fedshift edge --out`` as JSON.

Why a type: the launcher, the report and the tests read these numbers; an untyped dict read
with ``.get(k) or 0`` turned a renamed key into a silent zero. The invariants are checked once,
here, whenever a summary is built or loaded:

- every sample is counted once: ``seen == kept + sum(excluded)``, and per corruption / shift
  ``kept <= seen``, ``uploaded <= kept``, ``correct <= labelled <= seen``, their ``seen`` and
  ``uploaded`` summing to the totals;
- with a cloud every kept sample is in exactly one upload state: ``uploaded + upload_failed +
  upload_dropped + upload_unsent + upload_pending == kept``; at the end of a run nothing is
  pending (what the end flush did not deliver is ``upload_unsent``), so there ``uploaded +
  upload_failed + upload_dropped + upload_unsent == kept``; without a cloud nothing was uploaded;
- the timeline has one entry per batch in every column.

Counters (samples unless named as requests; the rules are :mod:`edge.uploader`'s): ``uploaded``
(acknowledged, each sequence counted once), ``upload_failed`` (refused by the cloud: not
retryable), ``upload_dropped`` / ``uploads_dropped`` (samples / requests dropped, oldest first, by
the buffer's bound ``max_buffered_samples`` while the cloud was unreachable), ``upload_unsent``
(still buffered when the run ended: the end flush timed out or the run failed; never
acknowledged, though the one in flight may have reached the cloud), ``upload_pending`` (queued or
being sent when the summary was built; 0 in a finished run's summary), ``upload_outages`` (times
the cloud became unreachable for the sender), ``uploads`` / ``upload_errors`` (requests
acknowledged / refused), ``upload_retries`` (attempts that failed transiently), ``bytes_up``
(serialized UploadRequest sizes, once per acknowledged request), ``bytes_down`` (ParameterUpdate
sizes received), ``versions_applied`` (subscriber + reset states accepted by the runtime; a
version superseded by a newer one while its session was being built counts but was never in
force), ``update_latency_s`` (cloud step done → in force here). Accuracy is online: each batch is scored
with the parameters in force before any adaptation on it.

``uploaded`` per corruption / shift and in the timeline means *acknowledged samples attributed
back to the batch they were selected from*: uploads are sent in the background, so an ack may
arrive batches later (or, after an outage, much later); it is counted in the row of the batch
whose samples it carried, not in the row where it arrived. So these columns sum to ``uploaded``
and, in a finished run, say how much of each shift reached the cloud; a timeline row's
``uploaded`` is final only once the run has ended (lockstep runs ack each batch before the next).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.selection import SelectionConfig
from protos.records import Record


@dataclass(frozen=True)
class ShiftStats:
    """Counters of one corruption (or one ``corruption@severity``)."""

    seen: int = 0
    labelled: int = 0
    correct: int = 0
    kept: int = 0
    uploaded: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.correct <= self.labelled <= self.seen and 0 <= self.uploaded <= self.kept <= self.seen):
            raise ValueError(f"inconsistent counters {self}")

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def plus(self, seen: int, kept: int, uploaded: int, correct: int | None) -> "ShiftStats":
        """These counters after one more batch (``correct`` None: the batch had no labels)."""
        labelled = seen if correct is not None else 0
        return ShiftStats(self.seen + seen, self.labelled + labelled, self.correct + (correct or 0),
                          self.kept + kept, self.uploaded + uploaded)


@dataclass(frozen=True)
class Excluded:
    """Samples not kept, by the first rule that excluded them (``edge.selection``)."""

    unreliable: int = 0
    low_informative: int = 0
    redundant: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.unreliable + self.low_informative + self.redundant + self.skipped


@dataclass(frozen=True)
class Latency:
    count: int = 0
    mean: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class ModelRef:
    """The model file this edge ran (``sha256`` of its bytes as loaded)."""

    name: str = ""
    path: str = ""
    sha256: str = ""
    num_classes: int = 0
    input_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class SubscriberStats:
    """The update stream's counters (``edge.client.Subscriber``)."""

    updates_received: int = 0
    versions_applied: int = 0
    stale_ignored: int = 0
    episode_ignored: int = 0
    apply_errors: int = 0
    reconnects: int = 0
    bytes_down: int = 0
    update_latency_s: Latency = field(default_factory=Latency)


TIMELINE_KEYS = ("seen", "n", "kept", "uploaded", "correct", "e_max", "mean_entropy", "version", "episode",
                 "corruption", "time_s")


@dataclass(frozen=True)
class Timeline:
    """One entry per batch: ``seen`` is cumulative, ``version`` the one the batch was predicted
    with, ``correct`` None when unlabelled, ``e_max`` None where the method has no threshold."""

    seen: tuple[int, ...] = ()
    n: tuple[int, ...] = ()
    kept: tuple[int, ...] = ()
    uploaded: tuple[int, ...] = ()
    correct: tuple[int | None, ...] = ()
    e_max: tuple[float | None, ...] = ()
    mean_entropy: tuple[float | None, ...] = ()
    version: tuple[int, ...] = ()
    episode: tuple[int, ...] = ()
    corruption: tuple[str, ...] = ()
    time_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        lengths = {k: len(getattr(self, k)) for k in TIMELINE_KEYS}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"timeline columns differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.seen)


@dataclass(frozen=True)
class EdgeSummary(Record):
    SCHEMA = "fedshift.edge-summary/1"
    DERIVED = ("accuracy", "kept_rate", "upload_rate", "bytes_down", "versions_applied", "samples_per_s")

    edge_id: str | None
    server: str | None  # None: ran without a cloud
    method: str
    selection: SelectionConfig
    model: ModelRef
    seen: int = 0
    batches: int = 0
    kept: int = 0
    excluded: Excluded = field(default_factory=Excluded)
    uploaded: int = 0
    upload_failed: int = 0
    upload_dropped: int = 0
    uploads_dropped: int = 0
    upload_unsent: int = 0
    upload_pending: int = 0
    upload_outages: int = 0
    uploads: int = 0
    upload_errors: int = 0
    upload_retries: int = 0
    reregistrations: int = 0  # times the cloud did not know this edge (a restart) and it registered again
    duplicates: int = 0
    bytes_up: int = 0
    updates: SubscriberStats = field(default_factory=SubscriberStats)
    reset_versions_applied: int = 0
    initial_version: int = 0
    final_version: int = 0
    cloud_version: int | None = None  # the last version an upload ack reported
    resets: int = 0
    episode: int = 0
    labelled: int = 0
    correct: int = 0
    per_corruption: dict[str, ShiftStats] = field(default_factory=dict)
    per_shift: dict[str, ShiftStats] = field(default_factory=dict)
    mean_entropy: float | None = None  # running mean entropy of the last episode (all of a continual stream)
    e_max_final: float | None = None
    metrics_reports: int = 0
    metrics_errors: int = 0
    sync_waits: int = 0
    sync_timeouts: int = 0
    sync_wait_s: float = 0.0
    wall_s: float = 0.0
    stopped_early: bool = False
    error: str | None = None  # set when the run failed
    timeline: Timeline = field(default_factory=Timeline)

    def __post_init__(self) -> None:
        if self.kept + self.excluded.total != self.seen:
            raise ValueError(f"counts: kept {self.kept} + excluded {self.excluded.total} != seen {self.seen}")
        lost = self.upload_dropped + self.upload_unsent + self.upload_pending
        if self.server is not None and self.uploaded + self.upload_failed + lost != self.kept:
            raise ValueError(f"counts: uploaded {self.uploaded} + failed {self.upload_failed} != kept {self.kept} - "
                             f"(dropped {self.upload_dropped} + unsent {self.upload_unsent} + pending "
                             f"{self.upload_pending})")
        if self.server is None and (self.uploaded or self.upload_failed or lost):
            raise ValueError("counts: uploads without a cloud")
        if not 0 <= self.correct <= self.labelled <= self.seen:
            raise ValueError(f"counts: correct {self.correct}, labelled {self.labelled}, seen {self.seen}")
        for name, table in (("per_corruption", self.per_corruption), ("per_shift", self.per_shift)):
            if table and sum(s.seen for s in table.values()) != self.seen:
                raise ValueError(f"counts: {name} seen does not sum to {self.seen}")
            if table and sum(s.uploaded for s in table.values()) != self.uploaded:
                raise ValueError(f"counts: {name} uploaded does not sum to {self.uploaded}")
        if len(self.timeline) not in (0, self.batches):
            raise ValueError(f"timeline has {len(self.timeline)} entries for {self.batches} batches")

    # ---------------------------------------------------------------- derived
    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def kept_rate(self) -> float:
        return self.kept / self.seen if self.seen else 0.0

    @property
    def upload_rate(self) -> float:
        return self.uploaded / self.seen if self.seen else 0.0

    @property
    def bytes_down(self) -> int:
        return self.updates.bytes_down

    @property
    def versions_applied(self) -> int:
        return self.updates.versions_applied + self.reset_versions_applied

    @property
    def samples_per_s(self) -> float | None:
        return self.seen / self.wall_s if self.wall_s > 0 else None
