"""The edge's offline upload buffer: a bounded FIFO of pending uploads and one sender thread.

Why: an edge keeps predicting while the cloud is unreachable (a restart, a flaky link), so its
uploads must wait somewhere instead of stalling inference or being thrown away after one retry
policy's 30 s. :meth:`Uploader.put` queues an upload under the sequence number the node gave it
and returns at once; the sender thread sends the queue oldest first with
:meth:`edge.client.CloudClient.upload`. The cloud de-duplicates by (edge id, sequence), so
re-sending an upload whose reply was lost is acknowledged as a duplicate, never counted twice.

Rules (each upload ends in exactly one of ``acked``, ``failed``, ``dropped``, ``unsent``):

- **Bound, in samples** (``max_buffered_samples``, the queue including the upload being sent).
  Queueing an upload that would exceed it drops the oldest queued uploads until it fits: their
  samples are counted as ``upload_dropped`` and the requests as ``uploads_dropped``, with one
  warning at the first drop and then at most one per ``drop_warning_every_s`` (the others at debug
  level, the totals in the closing line). Never dropped by the bound: the upload the sender has
  started on (it may already be at the cloud, its reply lost) and the upload being queued; so the
  buffer exceeds the bound only by those (an upload larger than the bound is kept alone).
- **Transient failures** (``RETRYABLE`` codes, :class:`edge.client.RetriesExhausted`) never drop
  an upload: it stays at the head and is sent again after a backoff from ``backoff`` (the
  client's :class:`~edge.client.RetryPolicy`: exponential with jitter, capped at its
  ``max_backoff_s``), between rounds of the client's own retries. Every transiently failed attempt
  counts in ``upload_retries``. One warning when an outage starts (``upload_outages`` counts them)
  and one when the cloud answers again (an ack or a refusal); during it the client's per-attempt
  lines drop to debug level.
- **"Not registered"** (:func:`edge.client.not_registered`: the cloud restarted): the sender calls
  ``on_not_registered`` (the node registers again, serialized with its own register and reset
  calls) and re-sends the same upload under the same sequence. A registration that fails
  transiently is handled like any transient failure.
- **Refused** (``INVALID_ARGUMENT``, ``OUT_OF_RANGE``, ``FAILED_PRECONDITION`` other than "not
  registered", or a ``ValueError`` such as an upload over the server's message limit): that
  upload's samples count as ``upload_failed``, the request as ``upload_errors``; it is dropped,
  logged, and the next one is sent.
- **Fatal** (any other status, e.g. ``UNAUTHENTICATED`` / ``PERMISSION_DENIED``, or an unexpected
  exception): the upload counts as failed, the sender stops, and :meth:`Uploader.check` raises the
  error in the node's thread at its next step, ending the run as an exception always did.
- **Closing** (:meth:`Uploader.close`): after an optional flush, no new send starts; the sender's
  current call may finish within ``grace_s`` and is counted by its outcome; whatever is still
  queued then counts as ``upload_unsent`` (one line with the count). The upload that was being
  sent may still have reached the cloud: ``unsent`` means "never acknowledged".

The counters (``uploaded`` = samples acknowledged, ``uploads``, ``duplicates``, ``bytes_up``,
``upload_retries``, ``cloud_version`` = the ``latest_version`` of the newest ack, and the ones
above) are updated by the sender under one lock and read as an :class:`UploaderStats` snapshot,
which also says how many acknowledged samples came from each ``tag`` (the node: the batch's
index) so that acknowledgements can be attributed back to the batch they were selected from.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from edge.client import RETRYABLE, CloudClient, RetriesExhausted, RetryPolicy, UploadResult, not_registered, status_code

__all__ = ["Outcome", "QueuedUpload", "Uploader", "UploaderConfig", "UploaderStats"]

log = logging.getLogger(__name__)

# answers about this one upload: drop it and send the next ("not registered" is handled before)
REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                     grpc.StatusCode.FAILED_PRECONDITION})


@dataclass(frozen=True)
class UploaderConfig:
    """The buffer's bound and the sender's pacing while the cloud is unreachable."""

    max_buffered_samples: int = 8192
    backoff: RetryPolicy = field(default_factory=RetryPolicy)  # only its backoff fields: the wait between rounds
    drop_warning_every_s: float = 30.0
    grace_s: float = 1.0  # how long close() lets the call in flight finish

    def __post_init__(self) -> None:
        if self.max_buffered_samples < 1:
            raise ValueError(f"max_buffered_samples must be >= 1, got {self.max_buffered_samples}")
        if self.drop_warning_every_s < 0 or self.grace_s < 0:
            raise ValueError("drop_warning_every_s and grace_s must be >= 0")


class Outcome(enum.Enum):
    ACKED = "acked"
    FAILED = "failed"
    DROPPED = "dropped"
    UNSENT = "unsent"


@dataclass(eq=False)
class QueuedUpload:
    """One pending upload; ``outcome`` is set once, by the uploader, under its lock (read it
    through :meth:`Uploader.wait`)."""

    sequence: int
    images: np.ndarray
    entropies: np.ndarray
    labels: np.ndarray | None
    edge_version: int
    seen: int
    episode: int
    tag: int | None = None
    started: bool = False  # the sender has sent it at least once: never dropped by the bound
    outcome: Outcome | None = None

    @property
    def samples(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class UploaderStats:
    """A consistent snapshot of the sender's counters (samples unless named as requests)."""

    uploaded: int = 0
    uploads: int = 0  # requests acknowledged
    duplicates: int = 0
    bytes_up: int = 0
    upload_retries: int = 0
    upload_failed: int = 0
    upload_errors: int = 0  # requests refused
    upload_dropped: int = 0
    uploads_dropped: int = 0  # requests
    upload_unsent: int = 0
    upload_pending: int = 0  # queued or being sent
    uploads_pending: int = 0  # requests
    upload_outages: int = 0
    cloud_version: int | None = None
    acked_by_tag: Mapping[int, int] = field(default_factory=dict)
    in_outage: bool = False  # the last attempt failed transiently (the cloud unreachable or busy)
    last_ack_unix: float | None = None  # wall time of the newest acknowledgement


class Uploader:
    """A bounded FIFO of uploads sent oldest first by one daemon thread; see the module docstring."""

    def __init__(self, client: CloudClient, config: UploaderConfig = UploaderConfig(), *,
                 on_not_registered: Callable[[], None] | None = None, seed: int | None = None,
                 name: str = "uploader") -> None:
        self.client, self.config = client, config
        self._on_not_registered = on_not_registered
        self._rng = random.Random(seed)
        self._cond = threading.Condition()
        self._queue: deque[QueuedUpload] = deque()
        self._pending = 0
        self._closing = False  # no new send starts
        self._closed = False  # counts are final; a late result is ignored
        self._error: BaseException | None = None
        self._stop = threading.Event()  # wakes the sender from a backoff
        self._counts = {k: 0 for k in ("uploaded", "uploads", "duplicates", "bytes_up", "upload_retries",
                                       "upload_failed", "upload_errors", "upload_dropped", "uploads_dropped",
                                       "upload_unsent", "upload_outages")}
        self._cloud_version: int | None = None
        self._last_ack_unix: float | None = None
        self._acked_by_tag: dict[int, int] = {}
        self._outage_since: float | None = None
        self._drop_warned_at: float | None = None
        self._drops_unreported = [0, 0]  # requests, samples since the last warning
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---------------------------------------------------------------- the node's side

    def start(self) -> Uploader:
        self._thread.start()
        return self

    def put(self, sequence: int, images: np.ndarray, entropies: np.ndarray, *, labels: np.ndarray | None = None,
            edge_version: int = 0, seen: int = 0, episode: int = 0, tag: int | None = None) -> QueuedUpload:
        """Queue one upload (the arrays are kept, not copied) and return at once; drops the oldest
        queued uploads when the bound would be exceeded."""
        item = QueuedUpload(int(sequence), images, entropies, labels, int(edge_version), int(seen), int(episode), tag)
        with self._cond:
            if self._closing:
                raise RuntimeError("the uploader is closed")
            self._queue.append(item)
            self._pending += item.samples
            if self._pending > self.config.max_buffered_samples:
                self._evict(item)
            self._cond.notify_all()
        return item

    def wait(self, upload: QueuedUpload, timeout: float) -> Outcome | None:
        """Block until ``upload`` has an outcome (None: still pending after ``timeout``, or the
        sender stopped on a fatal error)."""
        with self._cond:
            self._cond.wait_for(lambda: upload.outcome is not None or self._error is not None, timeout)
            return upload.outcome

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until every queued upload has an outcome; False if some remain."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue or self._error is not None or self._closing,
                                       timeout) and not self._queue

    def check(self) -> None:
        """Raise the fatal error that stopped the sender, if any (in the caller's thread)."""
        with self._cond:
            error = self._error
        if error is not None:
            raise error

    @property
    def cloud_version(self) -> int | None:
        """The latest version the newest acknowledgement named."""
        with self._cond:
            return self._cloud_version

    def stats(self) -> UploaderStats:
        with self._cond:
            return UploaderStats(**self._counts, upload_pending=self._pending, uploads_pending=len(self._queue),
                                 cloud_version=self._cloud_version, acked_by_tag=dict(self._acked_by_tag),
                                 in_outage=self._outage_since is not None, last_ack_unix=self._last_ack_unix)

    def close(self, flush_timeout: float = 0.0) -> None:
        """Flush up to ``flush_timeout``, stop sending, count what is left as unsent (idempotent)."""
        if flush_timeout > 0:
            self.flush(flush_timeout)
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.config.grace_s)
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._pending = 0
            for item in left:
                item.outcome = Outcome.UNSENT
                self._counts["upload_unsent"] += item.samples
            self._cond.notify_all()
            counts = dict(self._counts)
        if left:
            log.warning("%d upload(s) (%d samples) never acknowledged when the run ended: counted as "
                        "upload_unsent", len(left), sum(i.samples for i in left))
        if counts["uploads_dropped"]:
            log.warning("the upload buffer dropped %d upload(s) (%d samples) in all (max_buffered_samples %d)",
                        counts["uploads_dropped"], counts["upload_dropped"], self.config.max_buffered_samples)

    # ---------------------------------------------------------------- under the lock

    def _evict(self, newest: QueuedUpload) -> None:
        """Drop the oldest not-started uploads (never ``newest``) until the bound holds."""
        kept: deque[QueuedUpload] = deque()
        dropped: list[QueuedUpload] = []
        for item in self._queue:
            if (self._pending > self.config.max_buffered_samples and not item.started
                    and item is not newest):
                item.outcome = Outcome.DROPPED
                self._pending -= item.samples
                dropped.append(item)
            else:
                kept.append(item)
        self._queue = kept
        if not dropped:
            return
        n = sum(i.samples for i in dropped)
        self._counts["uploads_dropped"] += len(dropped)
        self._counts["upload_dropped"] += n
        self._drops_unreported[0] += len(dropped)
        self._drops_unreported[1] += n
        now = time.monotonic()
        if self._drop_warned_at is None or now - self._drop_warned_at >= self.config.drop_warning_every_s:
            log.warning("upload buffer full (%d samples, max_buffered_samples %d): dropped the oldest %d upload(s) "
                        "(%d samples) since the last warning, %d samples in all", self._pending,
                        self.config.max_buffered_samples, *self._drops_unreported, self._counts["upload_dropped"])
            self._drop_warned_at = now
            self._drops_unreported = [0, 0]
        else:
            log.debug("upload buffer full: dropped %s", [i.sequence for i in dropped])

    def _settle(self, item: QueuedUpload, outcome: Outcome) -> bool:
        """Take the head off the queue with its outcome; False once closed (the result is ignored)."""
        if self._closed or item.outcome is not None:
            return False
        assert self._queue and self._queue[0] is item
        self._queue.popleft()
        self._pending -= item.samples
        item.outcome = outcome
        self._cond.notify_all()
        return True

    # ---------------------------------------------------------------- the sender thread

    def _next(self) -> QueuedUpload | None:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closing)
            if self._closing:
                return None
            item = self._queue[0]
            item.started = True
            return item

    def _run(self) -> None:
        failures = 0  # consecutive failed attempts of the head: the backoff's exponent
        while (item := self._next()) is not None:
            try:
                res = self.client.upload(item.images, item.entropies, item.sequence, labels=item.labels,
                                         edge_version=item.edge_version, seen=item.seen, episode=item.episode,
                                         quiet=self._in_outage())
            except RetriesExhausted as exc:
                failures += 1
                self._transient(item, exc.attempts, f"{exc.code.name} after {exc.attempts} attempts")
            except grpc.RpcError as exc:
                code = status_code(exc)
                if code in RETRYABLE:
                    failures += 1
                    self._transient(item, 1, code.name)
                elif not_registered(exc) and self._on_not_registered is not None:
                    failures += 1
                    if not self._register_again(item):
                        return
                    if failures == 1:
                        continue  # registered again: re-send at once
                elif code in REFUSED:
                    failures = 0
                    self._refused(item, f"{code.name}: {exc.details() if hasattr(exc, 'details') else exc}")
                    continue
                else:
                    self._fatal(item, exc)
                    return
            except ValueError as exc:  # refused before sending (e.g. over the server's message limit)
                failures = 0
                self._refused(item, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a bug: stop and let the node raise it
                self._fatal(item, exc)
                return
            else:
                failures = 0
                self._acked(item, res)
                continue
            if self._stop.wait(self.config.backoff.delay(min(failures - 1, 30), self._rng)):
                return

    def _in_outage(self) -> bool:
        with self._cond:
            return self._outage_since is not None

    def _register_again(self, item: QueuedUpload) -> bool:
        """Call the node's re-registration; False when it failed fatally (the sender stops)."""
        assert self._on_not_registered is not None
        try:
            self._on_not_registered()
        except RetriesExhausted as exc:
            self._transient(item, 0, f"registering again: {exc}")
        except grpc.RpcError as exc:
            if status_code(exc) not in RETRYABLE:
                self._fatal(item, exc)
                return False
            self._transient(item, 0, f"registering again: {status_code(exc).name}")
        except Exception as exc:  # noqa: BLE001 - a bug: stop and let the node raise it
            self._fatal(item, exc)
            return False
        return True

    def _acked(self, item: QueuedUpload, res: UploadResult) -> None:
        with self._cond:
            if not self._settle(item, Outcome.ACKED):
                return
            c = self._counts
            c["uploads"] += 1
            c["uploaded"] += item.samples
            c["bytes_up"] += res.request_bytes
            c["upload_retries"] += res.attempts - 1
            c["duplicates"] += int(res.reply.duplicate)
            self._cloud_version = int(res.reply.latest_version)
            self._last_ack_unix = time.time()
            if item.tag is not None:
                self._acked_by_tag[item.tag] = self._acked_by_tag.get(item.tag, 0) + item.samples
            self._answered()

    def _answered(self) -> None:
        """The cloud answered (an ack or a refusal): an outage, if any, is over (caller holds the lock)."""
        if self._outage_since is not None:
            log.warning("uploads: the cloud is reachable again after %.1f s; %d upload(s) (%d samples) still "
                        "buffered", time.monotonic() - self._outage_since, len(self._queue), self._pending)
            self._outage_since = None

    def _transient(self, item: QueuedUpload, attempts: int, why: str) -> None:
        with self._cond:
            if self._closed:
                return
            self._counts["upload_retries"] += attempts
            start = self._outage_since is None
            if start:
                self._outage_since = time.monotonic()
                self._counts["upload_outages"] += 1
            pending = len(self._queue), self._pending
        if start:
            log.warning("uploads: the cloud is unreachable or busy (upload #%d: %s); buffering up to %d samples "
                        "and retrying (%d upload(s), %d samples queued)", item.sequence, why,
                        self.config.max_buffered_samples, *pending)

    def _refused(self, item: QueuedUpload, why: str) -> None:
        with self._cond:
            if not self._settle(item, Outcome.FAILED):
                return
            self._counts["upload_failed"] += item.samples
            self._counts["upload_errors"] += 1
            self._answered()
        log.error("upload #%d of %d samples refused, dropped: %s", item.sequence, item.samples, why)

    def _fatal(self, item: QueuedUpload | None, exc: BaseException) -> None:
        with self._cond:
            if item is not None and self._settle(item, Outcome.FAILED):
                self._counts["upload_failed"] += item.samples
                self._counts["upload_errors"] += 1
            self._error = exc
            self._cond.notify_all()
        log.error("uploads stopped: %s", exc)
