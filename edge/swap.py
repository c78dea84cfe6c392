"""A versioned value rebuilt off the caller's thread and swapped in atomically.

Why: putting a new normalization state in force on an ONNX Runtime edge means building a new
session (ORT fuses Conv+BN only when it builds one) — ~80 ms for ResNet-18 on a 2-core machine —
and releasing the old one takes milliseconds more. Neither belongs in the thread that hands over
the update nor in the one that predicts. :class:`VersionedSwap` keeps:

- the **serving** entry: the value predictions use and its version. :meth:`run` reads both from
  one entry, so a prediction is never torn and always knows the version that produced it; the
  swap replaces the entry under a lock held for a few assignments (:attr:`SwapStats.max_swap_hold_s`),
  so a prediction never waits for a build;
- the **accepted** state and version: the newest :meth:`offer` took (a partial update is merged
  onto the previous accepted state, not onto the one in force, so two quick partial updates both
  count). An offer not newer than the accepted version is refused, so versions in force only go
  up: an older build can never land after a newer one;
- at most one **pending** build: a single builder thread always builds the newest accepted state
  (started by the first offer, it waits ``linger_s`` for the next one before it ends: starting a
  thread on a busy machine took up to 94 ms here, which ``offer`` must not pay each time), so a
  burst of updates costs one build, not one each (the skipped versions count as ``superseded``;
  they were accepted but never in force).

A version counts as in force once predictions use it: :meth:`wait_for_version` and the listeners
(:meth:`add_listener`) fire at the swap, not when :meth:`offer` returns. Old values are released
by the updating thread once no prediction still runs on them, never inside a prediction.

Two locks: ``_lock`` guards the state and is held only for assignments (a prediction takes it
twice); waiting and waking go through a separate condition, notified after ``_lock`` is released
— waking a waiter while holding the lock a prediction needs let the woken thread preempt the
holder on a busy machine (measured: swaps held it 1.4 ms on average, 9 ms at worst).

With ``background=False`` the caller of :meth:`offer` builds and swaps itself and returns once
its version (or a newer one) is in force — the synchronous behaviour, kept as an option and as
the benchmarks' baseline.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)

S = TypeVar("S")  # the state an update carries (small)
V = TypeVar("V")  # the value built from it (a session: large, slow to build and to release)
R = TypeVar("R")


@dataclass(frozen=True)
class SwapStats:
    """Counters of a :class:`VersionedSwap` since it was made."""

    accepted: int = 0  # offers taken (each newer than every earlier one)
    built: int = 0  # versions put in force by a build
    superseded: int = 0  # accepted, then replaced by a newer one before they were in force
    failed: int = 0  # builds that raised (the value in force stays)
    last_build_s: float | None = None  # duration of the latest build
    max_swap_hold_s: float = 0.0  # longest the lock was held by a swap: the most a swap delays a prediction
    total_swap_hold_s: float = 0.0  # summed over the swaps (mean: divide by ``built``)


class _Entry(Generic[S, V]):
    """What predictions read; ``users`` counts the runs in progress on it (under the lock)."""

    __slots__ = ("value", "state", "version", "users")

    def __init__(self, value: V, state: S, version: int) -> None:
        self.value: V | None = value
        self.state = state
        self.version = version
        self.users = 0


def _drop(value: object) -> None:
    """Default release: let garbage collection free the value."""


class VersionedSwap(Generic[S, V]):
    """Serve one versioned value; rebuild it for newer states off the caller's thread."""

    def __init__(self, value: V, state: S, version: int, build: Callable[[S], V], *,
                 release: Callable[[V], None] = _drop, background: bool = True, name: str = "swap",
                 linger_s: float = 60.0, reap_timeout_s: float = 60.0) -> None:
        self.background = background
        self.name = name
        self._build, self._release = build, release
        self._linger_s, self._reap_timeout_s = linger_s, reap_timeout_s
        self._lock = threading.Lock()  # the state below; held for assignments only
        self._changed = threading.Condition(threading.Lock())  # waiters; notified with _lock released
        self._build_lock = threading.Lock()  # synchronous mode: one build at a time, never held by run()
        self._serving: _Entry[S, V] = _Entry(value, state, int(version))
        self._accepted_state, self._accepted_version = state, int(version)
        self._pending: tuple[S, int] | None = None
        self._retired: list[_Entry[S, V]] = []
        self._builder: threading.Thread | None = None
        self._listeners: list[Callable[[int], None]] = []
        self._closed = False
        self._counts = {"accepted": 0, "built": 0, "superseded": 0, "failed": 0}
        self._last_build_s: float | None = None
        self._max_hold_s = self._total_hold_s = 0.0
        self._last_error: BaseException | None = None

    # ---------------------------------------------------------------- reading

    @property
    def version(self) -> int:
        """The version in force: the one the next :meth:`run` uses."""
        with self._lock:
            return self._serving.version

    @property
    def accepted_version(self) -> int:
        """The newest version accepted by :meth:`offer` (in force, or being built to be)."""
        with self._lock:
            return self._accepted_version

    def state(self) -> S:
        """The state in force."""
        with self._lock:
            return self._serving.state

    def stats(self) -> SwapStats:
        with self._lock:
            return SwapStats(**self._counts, last_build_s=self._last_build_s, max_swap_hold_s=self._max_hold_s,
                             total_swap_hold_s=self._total_hold_s)

    def run(self, fn: Callable[[V], R]) -> tuple[R, int]:
        """``fn(value)`` with the value in force, and that value's version.

        ``fn`` must not keep a reference to the value: the updating thread releases it once no run
        is in progress on it.
        """
        with self._lock:
            entry = self._serving
            value = entry.value
            if value is None:
                raise RuntimeError(f"{self.name} is closed")
            entry.users += 1
        try:
            return fn(value), entry.version
        finally:
            del value  # the entry keeps it: releasing it is the updating thread's job, never this one's
            with self._lock:
                entry.users -= 1
                retired_idle = not entry.users and entry is not self._serving
            if retired_idle:
                self._notify()  # the builder may be waiting to release it

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Block until a version >= ``version`` is in force; False when ``timeout`` ran out."""
        return self._wait(lambda: self._serving.version >= version, timeout)

    def add_listener(self, fn: Callable[[int], None]) -> Callable[[], None]:
        """Call ``fn(version)`` after each swap, from the thread that swapped (keep it short).
        Returns a function that removes the listener."""
        with self._lock:
            self._listeners.append(fn)

        def remove() -> None:
            with self._lock:
                if fn in self._listeners:
                    self._listeners.remove(fn)

        return remove

    # ---------------------------------------------------------------- updating

    def offer(self, version: int, update: Callable[[S], S]) -> bool:
        """Accept ``update(accepted state)`` as ``version`` if it is newer than every accepted
        version; False otherwise. In the background mode it returns at once and the version is in
        force after its build; synchronously it returns once it is (``RuntimeError`` if its build
        failed). ``update`` runs under the lock: keep it cheap (a dict merge)."""
        version = int(version)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            if version <= self._accepted_version:
                return False
            state = update(self._accepted_state)
            if self._pending is not None:
                self._counts["superseded"] += 1
            self._pending = (state, version)
            self._accepted_state, self._accepted_version = state, version
            self._counts["accepted"] += 1
            builder = None
            if self.background and self._builder is None:
                builder = self._builder = threading.Thread(target=self._builder_loop, name=self.name, daemon=True)
        if builder is not None:
            builder.start()
        elif self.background:
            self._notify()  # wakes the lingering builder
        if not self.background:
            self._build_now(version)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking updates, let a build in progress finish, release every value (idempotent).
        Runs still in progress are waited for (up to ``timeout``) before their value is released."""
        with self._lock:
            self._closed = True
            self._pending = None
            builder = self._builder
        self._notify()  # a lingering builder ends now
        if builder is not None and builder.is_alive() and builder is not threading.current_thread():
            builder.join(timeout)
        with self._build_lock:
            with self._lock:
                entries = [*self._retired, self._serving]
            self._wait(lambda: not any(e.users for e in entries), timeout)
            with self._lock:
                self._retired = []
                values = self._detach([e for e in entries if not e.users])
        self._release_all(values)

    # ---------------------------------------------------------------- internals

    def _wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``predicate()`` (evaluated under ``_lock``) holds; False on timeout."""
        def check() -> bool:
            with self._lock:
                return predicate()

        with self._changed:
            return self._changed.wait_for(check, timeout)

    def _notify(self) -> None:
        """Wake every waiter (call with ``_lock`` released)."""
        with self._changed:
            self._changed.notify_all()

    def _build_now(self, version: int) -> None:
        with self._build_lock:
            job = self._take_job()
            error = self._build_and_swap(*job) if job is not None else None
            self._reap()
        with self._lock:
            if self._serving.version < version:
                raise RuntimeError(f"version {version} could not be put in force: {error or self._last_error}")

    def _builder_loop(self) -> None:
        while True:
            job = self._take_job()
            if job is not None:
                self._build_and_swap(*job)
                self._reap()
                continue
            # idle: wait (bounded) for runs still on retired values, or new work
            self._wait(lambda: self._pending is not None or not any(e.users for e in self._retired),
                       self._reap_timeout_s)
            self._reap()
            self._wait(lambda: self._pending is not None or self._closed, self._linger_s)  # then linger
            with self._lock:
                if self._pending is None:
                    self._builder = None
                    return

    def _take_job(self) -> tuple[S, int] | None:
        with self._lock:
            job, self._pending = self._pending, None
            return job

    def _build_and_swap(self, state: S, version: int) -> BaseException | None:
        """Build the value for ``state`` (no lock held), then put it in force under the lock."""
        start = time.perf_counter()
        try:
            value = self._build(state)
        except Exception as exc:  # noqa: BLE001 - a failed build must not kill the builder
            with self._lock:
                self._counts["failed"] += 1
                self._last_error = exc
                in_force = self._serving
                if self._pending is None and self._accepted_version == version:  # nothing newer: roll back
                    self._accepted_state, self._accepted_version = in_force.state, in_force.version
            self._notify()
            log.error("%s: building version %d failed (%s); version %d stays in force", self.name, version,
                      exc, in_force.version)
            return exc
        built_s = time.perf_counter() - start
        entry = _Entry(value, state, version)  # made before taking the lock: the swap is assignments only
        with self._lock:
            t0 = time.perf_counter()
            old = self._serving
            newer = version > old.version
            if newer:
                self._serving = entry
                self._retired.append(old)
            self._counts["built" if newer else "superseded"] += 1  # not newer: impossible with one builder
            self._last_build_s = built_s
            listeners = tuple(self._listeners) if newer else ()
            hold = time.perf_counter() - t0
            self._max_hold_s = max(self._max_hold_s, hold)
            self._total_hold_s += hold
        self._notify()
        if not newer:
            self._release_all([value])
        for fn in listeners:
            try:
                fn(version)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop updates
                log.exception("%s: listener failed on version %d", self.name, version)
        return None

    def _reap(self) -> None:
        """Release the retired values no run is using (outside the lock: it takes milliseconds)."""
        with self._lock:
            idle = [e for e in self._retired if not e.users]
            self._retired = [e for e in self._retired if e.users]
            values = self._detach(idle)
        self._release_all(values)

    @staticmethod
    def _detach(entries: list[_Entry[S, V]]) -> list[V]:
        values = [e.value for e in entries if e.value is not None]
        for e in entries:
            e.value = None
        return values

    def _release_all(self, values: list[V]) -> None:
        for value in values:
            try:
                self._release(value)
            except Exception:  # noqa: BLE001
                log.exception("%s: releasing an old value failed", self.name)
