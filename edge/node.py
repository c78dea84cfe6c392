"""The forward-only edge node: read → predict → select → upload; updates arrive on their own.

Why this order: CEMA's timing is "predict first, adapt after" — each batch is predicted with the
parameters in force when it arrives (applied in the background by :class:`edge.client.Subscriber`),
so the edge never waits for the cloud — unless a simulation asks for a bounded lockstep with
``NodeConfig.sync_timeout_s`` (an edge reading a file is far faster than the cloud's steps, and
CEMA's protocol predicts batch t with the cloud's step on batch t-1): after each upload it waits
for the version the cloud's ack names, which a ``--lockstep`` cloud sends after learning from it. A ``reset`` batch
(reset-per-shift protocol) first starts a new episode at the cloud and puts the edge's start-up
normalization state back in force under the version the cloud returns. With ``client=None`` the node runs forward-only without a cloud (the
"no adaptation" and "edge BN statistics" baselines); selection still runs and is counted as
``kept``, but nothing is uploaded.

The summary is an :class:`edge.summary.EdgeSummary` (its fields and invariants are documented
there); :meth:`EdgeNode.run` checks the invariants by building it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import grpc
import numpy as np

from edge.client import CloudClient, RetriesExhausted, Subscriber, not_registered
from edge.config import NodeConfig
from edge.selection import EntropySelector, Selection
from edge.sources import EdgeBatch, Source
from edge.summary import TIMELINE_KEYS, EdgeSummary, Excluded, ModelRef, ShiftStats, SubscriberStats, Timeline

__all__ = ["EdgeNode", "NodeConfig", "TIMELINE_KEYS"]

log = logging.getLogger(__name__)

@dataclass
class _Counters:
    seen: int = 0
    batches: int = 0
    kept: int = 0
    unreliable: int = 0
    low_informative: int = 0
    redundant: int = 0
    skipped: int = 0
    uploaded: int = 0
    upload_failed: int = 0
    uploads: int = 0
    upload_errors: int = 0
    upload_retries: int = 0
    reregistrations: int = 0
    duplicates: int = 0
    bytes_up: int = 0
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
    cloud_version: int | None = None
    per_corruption: dict[str, ShiftStats] = field(default_factory=lambda: defaultdict(ShiftStats))
    per_shift: dict[str, ShiftStats] = field(default_factory=lambda: defaultdict(ShiftStats))
    timeline: dict[str, list] = field(default_factory=lambda: {k: [] for k in TIMELINE_KEYS})


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
        self._episode = 0
        self._sequence = 0
        self._subscriber: Subscriber | None = None
        self._c = _Counters()
        self._start = time.monotonic()
        self._wall = 0.0
        self._waiting = False
        self._stopped_early = False
        self._last_log = 0.0

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
        """Process the whole source (or up to the limit / a stop); returns :meth:`summary`."""
        self._start = self._last_log = time.monotonic()
        try:
            if self.client is not None:
                self._connect()
            self._loop()
        finally:
            self._wall = time.monotonic() - self._start
            if self._subscriber is not None:
                self._subscriber.close()
            if self.client is not None:
                self._report_metrics(final=True)
        summary = self.summary()  # building it checks that every sample was counted once
        log.info("done: %s", self._progress_line())
        return summary

    # ---------------------------------------------------------------- loop

    def _connect(self) -> None:
        assert self.client is not None
        reply = self.client.register(self.runtime)
        self._sequence = int(reply.next_sequence)
        self._subscriber = self.client.subscribe(self.runtime, episode=self._episode)

    def _register_again(self, sync_episode: bool = True) -> None:
        """The cloud does not know this edge (it restarted): register again and go on; sequence
        numbers only move forward, and the parameters in force stay until a newer version comes."""
        assert self.client is not None
        log.warning("the cloud does not know edge %s (restarted?): registering again", self.edge_id)
        reply = self.client.register(self.runtime)
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
            except StopIteration:
                return
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
        if batch.reset:
            self._reset()
        logits, version = self.runtime.predict_versioned(batch.images)  # version that produced them
        sel = self.selector.select(logits, reference=batch.reference)
        correct = None
        if batch.labels is not None:
            correct = int((logits.argmax(axis=1) == batch.labels).sum())
        uploaded = self._upload(batch, sel, version) if self.client is not None else 0
        self._count(batch, sel, correct, uploaded, version)
        if uploaded and self.config.sync_timeout_s > 0:
            self._sync()

    def _sync(self) -> None:
        """Lockstep (simulation only): wait, bounded, until the version the upload's ack named is in
        force. A cloud started with ``--lockstep`` acks after learning from the upload, so that is
        the version its steps on it produced; nothing to wait for when they produced none."""
        target = self._c.cloud_version
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
        selector's thresholds start afresh too (the authors rebuild both filters per corruption)."""
        new = self._episode + 1
        self.selector.reset()
        if self.client is not None:
            if self._subscriber is not None:
                self._subscriber.episode = new  # from now on, older-episode updates are stale
            try:
                reply = self.client.reset(new)
            except grpc.RpcError as exc:
                if not not_registered(exc):
                    raise
                self._register_again(sync_episode=False)
                reply = self.client.reset(new)
            if reply.episode and reply.episode != new:
                log.warning("cloud answered reset to episode %d with episode %d", new, reply.episode)
            if self.runtime.apply(self._initial_state, int(reply.version)):
                self._c.reset_versions_applied += 1
        self._episode = new
        self._c.resets += 1
        log.debug("episode %d", new)

    def _upload(self, batch: EdgeBatch, sel: Selection, version: int) -> int:
        """Upload the kept samples under the next sequence number; returns how many were acked."""
        assert self.client is not None
        idx = np.flatnonzero(sel.mask)
        if idx.size == 0:
            return 0
        seq = self._sequence
        self._sequence += 1  # used once, whatever happens: a failed sequence is never reused
        labels = None if batch.labels is None else batch.labels[idx]
        c = self._c
        try:
            try:
                res = self.client.upload(batch.images[idx], sel.entropies[idx], seq, labels=labels,
                                         edge_version=version, seen=c.seen + len(batch), episode=self._episode)
            except grpc.RpcError as exc:
                if not not_registered(exc):
                    raise
                self._register_again()  # the cloud restarted: same upload, same sequence, once more
                res = self.client.upload(batch.images[idx], sel.entropies[idx], seq, labels=labels,
                                         edge_version=version, seen=c.seen + len(batch), episode=self._episode)
        except RetriesExhausted as exc:
            c.upload_failed += int(idx.size)
            c.upload_errors += 1
            log.error("upload #%d of %d samples dropped: %s", seq, idx.size, exc)
            return 0
        c.uploads += 1
        c.uploaded += int(idx.size)
        c.bytes_up += res.request_bytes
        c.upload_retries += res.attempts - 1
        c.duplicates += int(res.reply.duplicate)
        c.cloud_version = int(res.reply.latest_version)
        return int(idx.size)

    def _count(self, batch: EdgeBatch, sel: Selection, correct: int | None, uploaded: int, version: int) -> None:
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
        for table, key in ((c.per_corruption, batch.corruption), (c.per_shift, f"{batch.corruption}@{batch.severity}")):
            table[key] = table[key].plus(n, sel.kept, uploaded, correct)
        row = {"seen": c.seen, "n": n, "kept": sel.kept, "uploaded": uploaded, "correct": correct,
               "e_max": sel.e_max, "mean_entropy": _finite(sel.mean_entropy), "version": version,
               "episode": self._episode, "corruption": batch.corruption,
               "time_s": round(time.monotonic() - self._start, 4)}
        for k in TIMELINE_KEYS:
            c.timeline[k].append(row[k])

    # ---------------------------------------------------------------- reporting

    def _sub_stats(self) -> SubscriberStats:
        return SubscriberStats() if self._subscriber is None else self._subscriber.stats()

    def _report_metrics(self, final: bool = False) -> None:
        """Best-effort ReportMetrics: failures are counted, never fatal."""
        assert self.client is not None
        s = self.summary(timeline=False)
        keys = ("seen", "kept", "uploaded", "upload_rate", "kept_rate", "bytes_up", "bytes_down",
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

    def _progress_line(self) -> str:
        c = self._c
        acc = f"{100 * c.correct / c.labelled:.1f}%" if c.labelled else "n/a"
        e_max = f"{c.e_max:.3f}" if c.e_max is not None else "-"
        rate = 100 * c.kept / c.seen if c.seen else 0.0
        return (f"seen {c.seen}, acc {acc}, kept {c.kept} ({rate:.1f}%), uploaded {c.uploaded}, "
                f"version {self.runtime.version}, episode {self._episode}, E_max {e_max}")

    def summary(self, timeline: bool = True) -> EdgeSummary:
        """The counters so far as an :class:`EdgeSummary` (raises if they are inconsistent)."""
        c = self._c
        wall = self._wall or (time.monotonic() - self._start)
        sel_cfg = self.selector.config
        rt = self.runtime
        return EdgeSummary(
            edge_id=self.edge_id, server=self.client.address if self.client is not None else None,
            method=sel_cfg.method, selection=sel_cfg,
            model=ModelRef(name=rt.model_name, path=str(rt.path), sha256=rt.sha256, num_classes=rt.num_classes,
                           input_shape=tuple(rt.input_shape)),
            seen=c.seen, batches=c.batches, kept=c.kept,
            excluded=Excluded(c.unreliable, c.low_informative, c.redundant, c.skipped),
            uploaded=c.uploaded, upload_failed=c.upload_failed, uploads=c.uploads, upload_errors=c.upload_errors,
            upload_retries=c.upload_retries, reregistrations=c.reregistrations, duplicates=c.duplicates,
            bytes_up=c.bytes_up,
            updates=self._sub_stats(), reset_versions_applied=c.reset_versions_applied,
            initial_version=self._initial_version, final_version=rt.version, cloud_version=c.cloud_version,
            resets=c.resets, episode=self._episode, labelled=c.labelled, correct=c.correct,
            per_corruption=dict(c.per_corruption), per_shift=dict(c.per_shift),
            mean_entropy=_finite(self.selector.mean_entropy), e_max_final=c.e_max,
            metrics_reports=c.metrics_reports, metrics_errors=c.metrics_errors, sync_waits=c.sync_waits,
            sync_timeouts=c.sync_timeouts, sync_wait_s=c.sync_wait_s, wall_s=wall,
            stopped_early=self._stopped_early,
            timeline=Timeline(**{k: tuple(v) for k, v in c.timeline.items()}) if timeline else Timeline(),
        )


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
