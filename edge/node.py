"""The forward-only edge node: read → predict → select → upload; updates arrive on their own.

Why this order: CEMA's timing is "predict first, adapt after" — each batch is predicted with the
parameters in force when it arrives (applied in the background by :class:`edge.client.Subscriber`),
and its kept samples are queued to the offline upload buffer (:class:`edge.uploader.Uploader`,
sent oldest first by its own thread, each under the sequence number it got when queued), so the
edge never waits for the cloud, and keeps predicting while the cloud is unreachable — unless a
simulation asks for a bounded lockstep with ``NodeConfig.sync_timeout_s`` (an edge reading a file
is far faster than the cloud's steps, and CEMA's protocol predicts batch t with the cloud's step
on batch t-1): after each upload it waits until that upload is acknowledged (up to the client's
retry policy's total time plus one RPC deadline) and then for the version the ack names, which a
``--lockstep`` cloud sends after learning from it. A ``reset`` batch (reset-per-shift protocol)
first waits (up to ``flush_timeout_s``) for the buffered uploads of the episode it ends, then
starts a new episode at the cloud and puts the edge's start-up normalization state back in force
under the version the cloud returns, waiting until it is in force (the runtime builds its session
in the background), so the episode's first batch is predicted with it on every run alike. At the
end of a run the buffer is flushed for up to ``flush_timeout_s``; what is left is counted as
``upload_unsent``. A fatal upload error
(``UNAUTHENTICATED``, ...) met by the sender is raised at the node's next step. With
``client=None`` the node runs forward-only without a cloud (the "no adaptation" and "edge BN
statistics" baselines); selection still runs and is counted as ``kept``, but nothing is uploaded.

Threads: the main loop, the subscriber and the uploader's sender. Register and reset calls are
serialized by one lock (the sender registers again when the cloud forgot the edge); sequence
numbers are handed out under another lock that is never held during an RPC, so queueing an
upload never waits for the cloud.

The summary is an :class:`edge.summary.EdgeSummary` (its fields and invariants are documented
there); :meth:`EdgeNode.run` checks the invariants by building it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import grpc
import numpy as np

from edge.client import CloudClient, Subscriber, not_registered
from edge.config import NodeConfig
from edge.health import EdgeState, write_state
from edge.selection import EntropySelector, Selection
from edge.sources import EdgeBatch, Source
from edge.summary import TIMELINE_KEYS, EdgeSummary, Excluded, ModelRef, ShiftStats, SubscriberStats, Timeline
from edge.uploader import Outcome, QueuedUpload, Uploader, UploaderConfig, UploaderStats

__all__ = ["EdgeNode", "NodeConfig", "TIMELINE_KEYS"]

log = logging.getLogger(__name__)

# how long a reset waits for the restored state's session to be built and in force: far above any
# build measured (ResNet-18: ~0.1 s), a bound only against a build that never finishes
RESET_IN_FORCE_TIMEOUT_S = 60.0


@dataclass
class _Counters:
    seen: int = 0
    batches: int = 0
    kept: int = 0
    unreliable: int = 0
    low_informative: int = 0
    redundant: int = 0
    skipped: int = 0
    reregistrations: int = 0
    labelled: int = 0
    correct: int = 0
    resets: int = 0
    reset_versions_applied: int = 0
    metrics_reports: int = 0
    metrics_errors: int = 0
    sync_waits: int = 0
    sync_timeouts: int = 0
    sync_wait_s: float = 0.0
    e_max: float | None = None
    # without ``uploaded``: acks are attributed back to their batch when a summary is built
    per_corruption: dict[str, ShiftStats] = field(default_factory=lambda: defaultdict(ShiftStats))
    per_shift: dict[str, ShiftStats] = field(default_factory=lambda: defaultdict(ShiftStats))
    shift_of_batch: list[tuple[str, str]] = field(default_factory=list)  # (corruption, corruption@severity)
    timeline: dict[str, list] = field(default_factory=lambda: {k: [] for k in TIMELINE_KEYS if k != "uploaded"})


class EdgeNode:
    """One edge: a runtime, a source, an optional cloud client and a selector."""

    def __init__(self, runtime, source: Source, client: CloudClient | None, selector: EntropySelector, *,
                 config: NodeConfig = NodeConfig(), edge_id: str | None = None,
                 stop_event: threading.Event | None = None) -> None:
        self.runtime, self.source, self.client, self.selector = runtime, source, client, selector
        self.config = config
        self.edge_id = client.edge_id if client is not None else edge_id
        self._stop = stop_event or threading.Event()
        self._initial_state = runtime.norm_state()  # what a reset puts back in force
        self._initial_version = runtime.version
        self._episode = 0  # written by the main thread only, under _cloud_lock
        self._sequence = 0  # under _sequence_lock
        self._cloud_lock = threading.RLock()  # one register / reset call at a time (main and sender threads)
        self._sequence_lock = threading.Lock()  # never held during an RPC
        self._subscriber: Subscriber | None = None
        self._uploader: Uploader | None = None
        self._c = _Counters()
        self._start = time.monotonic()
        self._wall = 0.0
        self._waiting = False
        self._stopped_early = False
        self._last_log = 0.0
        self._started_unix = time.time()
        self._seen_version, self._version_unix = runtime.version, None  # when the version in force last changed

    # ---------------------------------------------------------------- control

    def stop(self) -> None:
        """Ask the loop to stop after the current batch (signal handlers call this)."""
        self._stop.set()

    @property
    def waiting_for_input(self) -> bool:
        """True while blocked reading the source: interrupting there loses nothing."""
        return self._waiting

    @property
    def subscriber(self) -> Subscriber | None:
        return self._subscriber

    def run(self) -> EdgeSummary:
        """Process the whole source (or up to the limit / a stop), flush the upload buffer (bounded);
        returns :meth:`summary`."""
        self._start = self._last_log = time.monotonic()
        self._started_unix = time.time()
        health = _HealthWriter(self) if self.config.state_file else None
        try:
            if self.client is not None:
                self._connect()
            self._loop()
            if self._uploader is not None:
                self._uploader.flush(self.config.flush_timeout_s)
                self._uploader.check()
        finally:
            if self._uploader is not None:
                self._uploader.close()  # what is still buffered is counted as upload_unsent
            self._wall = time.monotonic() - self._start
            if self._subscriber is not None:
                self._subscriber.close()
            if self.client is not None:
                self._report_metrics(final=True)
            if health is not None:
                health.close()  # the last write says the edge stopped
        summary = self.summary()  # building it checks that every sample was counted once
        log.info("done: %s", self._progress_line())
        return summary

    # ---------------------------------------------------------------- loop

    def _connect(self) -> None:
        assert self.client is not None
        with self._cloud_lock:
            reply = self.client.register(self.runtime)
        with self._sequence_lock:
            self._sequence = int(reply.next_sequence)
        self._subscriber = self.client.subscribe(self.runtime, episode=self._episode)
        retry = self.client.retry
        self._uploader = Uploader(self.client, UploaderConfig(self.config.max_buffered_samples, backoff=retry),
                                  on_not_registered=self._register_again, name=f"uploader-{self.edge_id}").start()

    def _register_again(self, sync_episode: bool = True) -> None:
        """The cloud does not know this edge (it restarted): register again and go on; sequence
        numbers only move forward, and the parameters in force stay until a newer version comes.
        Called by the main thread (a reset) and by the uploader's sender (an upload)."""
        assert self.client is not None
        with self._cloud_lock:
            log.warning("the cloud does not know edge %s (restarted?): registering again", self.edge_id)
            reply = self.client.register(self.runtime)
            with self._sequence_lock:
                self._sequence = max(self._sequence, int(reply.next_sequence))
            self._c.reregistrations += 1
            if sync_episode and self._episode:  # the restarted cloud starts at episode 0: bring it to ours
                self.client.reset(self._episode)

    def _batches(self) -> Iterator[EdgeBatch]:
        """The source's batches, cut at the limit; an interrupt while blocked on input ends them."""
        it = iter(self.source)
        remaining = self.config.limit
        while not self._stop.is_set() and (remaining is None or remaining > 0):
            self._waiting = True
            try:
                batch = next(it)
            except StopIteration:  # the end of the source, or a live source that saw the stop
                break
            except KeyboardInterrupt:
                self._stopped_early = True
                return
            finally:
                self._waiting = False
            if remaining is not None:
                if len(batch) > remaining:
                    batch = batch.head(remaining)
                remaining -= len(batch)
            if len(batch):
                yield batch
        if self._stop.is_set():
            self._stopped_early = True

    def _loop(self) -> None:
        for batch in self._batches():
            self._step(batch)
            if self.client is not None and self.config.metrics_every and \
                    self._c.batches % self.config.metrics_every == 0:
                self._report_metrics()
            now = time.monotonic()
            if now - self._last_log >= self.config.log_every_s:
                self._last_log = now
                log.info("%s", self._progress_line())

    def _step(self, batch: EdgeBatch) -> None:
        if self._uploader is not None:
            self._uploader.check()  # a fatal upload error ends the run here
        if batch.reset:
            self._reset()
        logits, version = self.runtime.predict_versioned(batch.images)  # version that produced them
        sel = self.selector.select(logits, reference=batch.reference)
        correct = None
        if batch.labels is not None:
            correct = int((logits.argmax(axis=1) == batch.labels).sum())
        queued = self._upload(batch, sel, version) if self._uploader is not None else None
        self._count(batch, sel, correct, version)
        if queued is not None and self.config.sync_timeout_s > 0:
            self._await_ack(queued)

    def _await_ack(self, upload: QueuedUpload) -> None:
        """Lockstep: wait until the upload is acknowledged (bounded by the longest one upload call
        may take: the retry policy's total plus one deadline), then for the version its ack named.
        A wait that runs out counts as a sync timeout; the upload stays buffered."""
        assert self._uploader is not None and self.client is not None
        bound = self.client.retry.max_total_s + self.client.timeout
        t0 = time.monotonic()
        outcome = self._uploader.wait(upload, bound)
        if outcome is Outcome.ACKED:
            self._sync()
        elif outcome is None:
            c = self._c
            c.sync_waits += 1
            c.sync_timeouts += 1
            c.sync_wait_s += time.monotonic() - t0
            log.warning("lockstep: upload #%d not acknowledged within %.1f s; going on (it stays buffered)",
                        upload.sequence, bound)

    def _sync(self) -> None:
        """Lockstep (simulation only): wait, bounded, until the version the upload's ack named is in
        force. A cloud started with ``--lockstep`` acks after learning from the upload, so that is
        the version its steps on it produced; nothing to wait for when they produced none."""
        target = self._uploader.cloud_version if self._uploader is not None else None
        if self._subscriber is None or target is None or self.runtime.version >= target:
            return
        t0 = time.monotonic()
        ok = self._subscriber.wait_for_version(target, self.config.sync_timeout_s)
        c = self._c
        c.sync_waits += 1
        c.sync_timeouts += int(not ok)
        c.sync_wait_s += time.monotonic() - t0

    def _reset(self) -> None:
        """Start the next episode: at the cloud, then locally with the version it returned; the
        selector's thresholds start afresh too (the authors rebuild both filters per corruption).
        The episode's buffered uploads go first (bounded): a reset never overtakes them."""
        new = self._episode + 1
        self.selector.reset()
        if self.client is not None:
            if self._uploader is not None and not self._uploader.flush(self.config.flush_timeout_s):
                self._uploader.check()
                log.warning("reset to episode %d: uploads of episode %d still buffered after %.1f s; resetting "
                            "anyway (the cloud acknowledges them as stale)", new, self._episode,
                            self.config.flush_timeout_s)
            if self._subscriber is not None:
                self._subscriber.episode = new  # from now on, older-episode updates are stale
            with self._cloud_lock:
                try:
                    reply = self.client.reset(new)
                except grpc.RpcError as exc:
                    if not not_registered(exc):
                        raise
                    self._register_again(sync_episode=False)
                    reply = self.client.reset(new)
                self._episode = new  # with the reset, under the lock: a re-registering sender sees both or neither
            if reply.episode and reply.episode != new:
                log.warning("cloud answered reset to episode %d with episode %d", new, reply.episode)
            if self.runtime.apply(self._initial_state, int(reply.version)):
                self._c.reset_versions_applied += 1
            # in force before the episode's first batch (or a newer version, already accepted)
            if not self.runtime.wait_for_version(int(reply.version), RESET_IN_FORCE_TIMEOUT_S):
                log.warning("reset to episode %d: version %d not in force after %.0f s; predicting with version %d",
                            new, reply.version, RESET_IN_FORCE_TIMEOUT_S, self.runtime.version)
        self._episode = new
        self._c.resets += 1
        log.debug("episode %d", new)

    def _upload(self, batch: EdgeBatch, sel: Selection, version: int) -> QueuedUpload | None:
        """Queue the kept samples under the next sequence number (assigned here, once: a sequence
        is never reused); returns at once with the queued upload (None: nothing kept)."""
        assert self._uploader is not None
        idx = np.flatnonzero(sel.mask)
        if idx.size == 0:
            return None
        with self._sequence_lock:
            seq = self._sequence
            self._sequence += 1
        labels = None if batch.labels is None else batch.labels[idx]
        return self._uploader.put(seq, batch.images[idx], sel.entropies[idx], labels=labels, edge_version=version,
                                  seen=self._c.seen + len(batch), episode=self._episode, tag=self._c.batches)

    def _count(self, batch: EdgeBatch, sel: Selection, correct: int | None, version: int) -> None:
        c, n = self._c, len(batch)
        c.seen += n
        c.batches += 1
        c.kept += sel.kept
        c.unreliable += sel.unreliable
        c.low_informative += sel.low_informative
        c.redundant += sel.redundant
        c.skipped += sel.skipped
        c.e_max = sel.e_max
        if correct is not None:
            c.labelled += n
            c.correct += correct
        shift = f"{batch.corruption}@{batch.severity}"
        for table, key in ((c.per_corruption, batch.corruption), (c.per_shift, shift)):
            table[key] = table[key].plus(n, sel.kept, 0, correct)
        c.shift_of_batch.append((batch.corruption, shift))
        row = {"seen": c.seen, "n": n, "kept": sel.kept, "correct": correct,
               "e_max": sel.e_max, "mean_entropy": _finite(sel.mean_entropy), "version": version,
               "episode": self._episode, "corruption": batch.corruption,
               "time_s": round(time.monotonic() - self._start, 4)}
        for k, column in c.timeline.items():
            column.append(row[k])

    # ---------------------------------------------------------------- reporting

    def _sub_stats(self) -> SubscriberStats:
        return SubscriberStats() if self._subscriber is None else self._subscriber.stats()

    def _up_stats(self) -> UploaderStats:
        return UploaderStats() if self._uploader is None else self._uploader.stats()

    def _report_metrics(self, final: bool = False) -> None:
        """Best-effort ReportMetrics: failures are counted, never fatal."""
        assert self.client is not None
        s = self.summary(timeline=False)
        keys = ("seen", "kept", "uploaded", "upload_rate", "kept_rate", "bytes_up", "bytes_down",
                "upload_failed", "upload_dropped", "upload_pending", "upload_unsent", "upload_outages",
                "versions_applied", "accuracy", "e_max_final", "mean_entropy", "final_version", "episode")
        values = {k: float(v) for k in keys
                  if isinstance(v := getattr(s, k), (int, float)) and math.isfinite(v)}
        values["final"] = float(final)
        try:
            self.client.report_metrics(self._c.batches, values)
            self._c.metrics_reports += 1
        except grpc.RpcError as exc:
            self._c.metrics_errors += 1
            log.warning("report_metrics failed: %s", exc.code() if hasattr(exc, "code") else exc)

    def health(self, running: bool = True) -> EdgeState:
        """The node's health for the state file (:mod:`edge.health`); safe from any thread."""
        c, u = self._c, self._up_stats()
        version = self.runtime.version
        if version != self._seen_version:
            self._seen_version, self._version_unix = version, time.time()
        return EdgeState(edge_id=str(self.edge_id), pid=os.getpid(), written_unix=time.time(),
                         started_unix=self._started_unix, running=running,
                         server=self.client.address if self.client is not None else None, seen=c.seen, kept=c.kept,
                         uploaded=u.uploaded, version=version, last_version_unix=self._version_unix,
                         last_upload_unix=u.last_ack_unix,
                         cloud_reachable=(not u.in_outage) if self.client is not None else None,
                         buffered_samples=u.upload_pending,
                         buffer_bound=self.config.max_buffered_samples if self.client is not None else 0,
                         dropped=u.upload_dropped, failed=u.upload_failed)

    def _progress_line(self) -> str:
        c, u = self._c, self._up_stats()
        acc = f"{100 * c.correct / c.labelled:.1f}%" if c.labelled else "n/a"
        e_max = f"{c.e_max:.3f}" if c.e_max is not None else "-"
        rate = 100 * c.kept / c.seen if c.seen else 0.0
        lost = "".join(f", {name} {n}" for name, n in (("failed", u.upload_failed), ("dropped", u.upload_dropped),
                                                       ("unsent", u.upload_unsent)) if n)
        return (f"seen {c.seen}, acc {acc}, kept {c.kept} ({rate:.1f}%), uploaded {u.uploaded}, "
                f"buffered {u.upload_pending}{lost}, version {self.runtime.version}, episode {self._episode}, "
                f"E_max {e_max}")

    def summary(self, timeline: bool = True) -> EdgeSummary:
        """The counters so far as an :class:`EdgeSummary` (raises if they are inconsistent)."""
        c, u = self._c, self._up_stats()
        wall = self._wall or (time.monotonic() - self._start)
        sel_cfg = self.selector.config
        rt = self.runtime
        per_corruption, per_shift = dict(c.per_corruption), dict(c.per_shift)
        acked_corruption: dict[str, int] = defaultdict(int)
        acked_shift: dict[str, int] = defaultdict(int)
        for batch, n in u.acked_by_tag.items():  # acks attributed back to the batch they came from
            corruption, shift = c.shift_of_batch[batch]
            acked_corruption[corruption] += n
            acked_shift[shift] += n
        for table, acked in ((per_corruption, acked_corruption), (per_shift, acked_shift)):
            for key, n in acked.items():
                table[key] = replace(table[key], uploaded=n)
        columns = {k: tuple(v) for k, v in c.timeline.items()}
        columns["uploaded"] = tuple(u.acked_by_tag.get(j, 0) for j in range(c.batches))
        return EdgeSummary(
            edge_id=self.edge_id, server=self.client.address if self.client is not None else None,
            method=sel_cfg.method, selection=sel_cfg,
            model=ModelRef(name=rt.model_name, path=str(rt.path), sha256=rt.sha256, num_classes=rt.num_classes,
                           input_shape=tuple(rt.input_shape)),
            seen=c.seen, batches=c.batches, kept=c.kept,
            excluded=Excluded(c.unreliable, c.low_informative, c.redundant, c.skipped),
            uploaded=u.uploaded, upload_failed=u.upload_failed, upload_dropped=u.upload_dropped,
            uploads_dropped=u.uploads_dropped, upload_unsent=u.upload_unsent, upload_pending=u.upload_pending,
            upload_outages=u.upload_outages, uploads=u.uploads, upload_errors=u.upload_errors,
            upload_retries=u.upload_retries, reregistrations=c.reregistrations, duplicates=u.duplicates,
            bytes_up=u.bytes_up,
            updates=self._sub_stats(), reset_versions_applied=c.reset_versions_applied,
            initial_version=self._initial_version, final_version=rt.version, cloud_version=u.cloud_version,
            resets=c.resets, episode=self._episode, labelled=c.labelled, correct=c.correct,
            per_corruption=per_corruption, per_shift=per_shift,
            mean_entropy=_finite(self.selector.mean_entropy), e_max_final=c.e_max,
            metrics_reports=c.metrics_reports, metrics_errors=c.metrics_errors, sync_waits=c.sync_waits,
            sync_timeouts=c.sync_timeouts, sync_wait_s=c.sync_wait_s, wall_s=wall,
            stopped_early=self._stopped_early,
            timeline=Timeline(**columns) if timeline else Timeline(),
        )


class _HealthWriter:
    """Rewrites the node's state file every ``state_every_s`` from its own thread (a source that
    blocks, e.g. a camera or a watched folder, does not make a healthy edge look stuck)."""

    def __init__(self, node: EdgeNode) -> None:
        self._node, self._path = node, node.config.state_file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-health", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._write(running=True)
            if self._stop.wait(self._node.config.state_every_s):
                return

    def _write(self, running: bool) -> None:
        try:
            write_state(self._path, self._node.health(running))
        except OSError as exc:  # a full or read-only disk must not stop the edge
            log.warning("cannot write the state file %s: %s", self._path, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._write(running=False)


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
