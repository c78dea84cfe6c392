"""The cloud's learner thread: what the RPC handlers queued goes into the learners, and the
learners step round-robin, each step published as a new version.

Why one thread and a queue: an upload is answered in milliseconds whatever the learners are
doing, and no learner step runs concurrently with another (the models share the cores). Rules:

- one step per active learner per pass, so no edge waits behind another's backlog;
- a learner stays active until a step finds nothing to do; the uploads it was given are then
  marked done (``lockstep`` uploads wait for that);
- queued samples of an episode the learner has left (a ``Reset`` raced them) are dropped and
  counted, never fed to the new episode;
- the backlog (queued + inside learners) is what backpressure is measured on;
- moving items from the queue into the learners happens under the service's journal lock, so a
  snapshot sees each item queued or fed, never in between;
- on stop, what is still queued stays queued (for the last snapshot) and every waiter is released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from server.edges import LearnerSlot, QueuedUpload
from server.telemetry import CloudTelemetry

log = logging.getLogger(__name__)


class LearnerWorker:
    """The queue of validated uploads and the thread that feeds and steps the learners.

    ``slots`` lists the learners now; ``publish(slot)`` makes a learner's state its next version
    (called with ``slot.lock`` held); ``journal_lock`` is the service's; ``after_pass`` runs after
    every pass of the loop (rates).
    """

    def __init__(self, slots: Callable[[], list[LearnerSlot]], publish: Callable[[LearnerSlot], None],
                 journal_lock: threading.Lock, telemetry: CloudTelemetry,
                 after_pass: Callable[[], None] = lambda: None) -> None:
        self._slots, self._publish, self._journal_lock = slots, publish, journal_lock
        self._telemetry, self._after_pass = telemetry, after_pass
        self._work = threading.Condition()  # guards _pending, _busy, _stopping
        self._pending: deque[QueuedUpload] = deque()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cloud-learner", daemon=True)
        self._thread.start()

    def begin_stop(self) -> None:
        """Take no more work; the thread ends after the step it is in."""
        with self._work:
            self._stopping = True
            self._work.notify_all()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def stopping(self) -> bool:
        with self._work:
            return self._stopping

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until everything queued went through the learners and no step is running."""
        deadline = time.monotonic() + timeout
        with self._work:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    return False
                self._work.wait(left)
        return True

    # ---------------------------------------------------------------- the queue

    def enqueue(self, item: QueuedUpload) -> None:
        with self._work:
            self._pending.append(item)
            self._work.notify_all()

    def backlog(self) -> int:
        """Samples queued or inside the learners, not yet learned from (one consistent count: the
        thread cannot move an item from the queue into a learner meanwhile)."""
        with self._work:
            return sum(len(i.images) for i in self._pending) + sum(s.learner.queue_size for s in self._slots())

    def pending(self) -> list[QueuedUpload]:
        """What is queued now, oldest first (a copy)."""
        with self._work:
            return list(self._pending)

    def take_pending(self) -> list[QueuedUpload]:
        """Empty the queue and return what it held (caller holds the journal lock)."""
        with self._work:
            items = list(self._pending)
            self._pending.clear()
        return items

    def feed(self, items: list[QueuedUpload]) -> None:
        """Give queued samples to their learners; samples of an episode their learner left are dropped."""
        for item in items:
            slot = item.slot
            with slot.lock:
                if item.episode != slot.episode:
                    log.info("learner %s: dropped %d samples of past episode %d (now %d)", slot.name,
                             len(item.images), item.episode, slot.episode)
                    self._telemetry.scalar(f"cloud/{slot.name}/stale_samples", len(item.images), slot.steps)
                    continue
                slot.learner.add(item.images, item.labels)
                slot.learned_samples += len(item.images)

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        # every learner gets a first look: a restored one may hold queued samples to learn from
        active: dict[int, LearnerSlot] = {id(slot): slot for slot in self._slots()}
        waiting: dict[int, list[QueuedUpload]] = {}  # items whose learner has not gone idle since
        while True:
            with self._work:
                while not self._pending and not active and not self._stopping:
                    self._work.wait()
                if self._stopping:  # what is still pending stays there, for the last snapshot
                    for item in [*self._pending, *(i for items in waiting.values() for i in items)]:
                        item.done.set()
                    return
                self._busy = True
            try:
                with self._journal_lock:
                    items = self.take_pending()
                    self.feed(items)
                for item in items:
                    active.setdefault(id(item.slot), item.slot)
                    waiting.setdefault(id(item.slot), []).append(item)
                for key, slot in list(active.items()):
                    if self.stopping or not self._step_once(slot):
                        del active[key]
                        for item in waiting.pop(key, []):
                            item.done.set()
                self._after_pass()
            finally:
                with self._work:
                    self._busy = bool(active)
                    self._work.notify_all()

    def _step_once(self, slot: LearnerSlot) -> bool:
        """One learner step and its publication; False when the learner has nothing to do.

        ``slot.lock`` is held for one step only, so a Reset waits for at most one step."""
        start = time.perf_counter()
        with slot.lock:
            try:
                stats = slot.learner.step()
            except Exception:  # keep serving the other learners; the error is counted and logged
                slot.errors += 1
                log.exception("learner %s: step failed", slot.name)
                return False
            if stats is None:
                return False
            slot.steps += 1
            self._publish(slot)
        self._telemetry.learner_step(slot.name, slot.steps, stats, 1000 * (time.perf_counter() - start),
                                     queue=slot.learner.queue_size, replay=len(slot.learner.replay),
                                     version=slot.version)
        return True
