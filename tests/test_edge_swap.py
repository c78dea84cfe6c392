"""edge.swap.VersionedSwap: versions only go up, builds off the caller's thread, safe release."""

import threading
import time

import pytest

from edge.swap import VersionedSwap

WAIT_S = 10.0


class Value:
    """A built value that records who releases it and whether a run was still on it."""

    def __init__(self, state: dict, version_hint: int) -> None:
        self.state, self.version_hint = dict(state), version_hint
        self.running = 0
        self.released_by: str | None = None
        self.released_while_running = False

    def release(self) -> None:
        self.released_by = threading.current_thread().name
        self.released_while_running = self.running > 0


class GatedBuilder:
    """A build function whose calls block until the test opens their gate."""

    def __init__(self) -> None:
        self.gates: dict[int, threading.Event] = {}
        self.started: list[int] = []
        self.built: list[Value] = []
        self.cond = threading.Condition()

    def gate(self, version: int) -> threading.Event:
        return self.gates.setdefault(version, threading.Event())

    def __call__(self, state: dict) -> Value:
        version = state["v"]
        with self.cond:
            self.started.append(version)
            self.cond.notify_all()
        assert self.gate(version).wait(WAIT_S), f"gate {version} never opened"
        value = Value(state, version)
        self.built.append(value)
        return value

    def wait_started(self, version: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: version in self.started, WAIT_S)


def _swap(build, *, background: bool = True) -> VersionedSwap:
    return VersionedSwap(Value({"v": 0}, 0), {"v": 0}, 0, build, release=Value.release, background=background,
                         name="test-swap")


def _set(version: int, **extra):
    return lambda current: {**current, "v": version, **extra}


def test_an_older_build_finishing_after_a_newer_offer_never_lands_after_it() -> None:
    builder = GatedBuilder()
    swap = _swap(builder)
    in_force: list[int] = []
    swap.add_listener(in_force.append)
    assert swap.offer(1, _set(1))
    builder.wait_started(1)  # v1 is being built ...
    assert swap.offer(2, _set(2))  # ... while v2 and then v3 arrive: v3 supersedes v2
    assert swap.offer(3, _set(3))
    assert not swap.offer(2, _set(2)) and not swap.offer(3, _set(3))  # stale: not newer than accepted
    assert swap.version == 0 and swap.accepted_version == 3
    assert not swap.wait_for_version(1, 0.05)  # accepted is not in force: the build has not finished
    for v in (1, 2, 3):
        builder.gate(v).set()
    assert swap.wait_for_version(3, WAIT_S)
    assert in_force == [1, 3] and builder.started == [1, 3]  # v2 never built, v1 never after v3
    assert swap.state()["v"] == 3
    stats = swap.stats()
    assert (stats.accepted, stats.built, stats.superseded, stats.failed) == (3, 2, 1, 0)
    swap.close()


def test_offer_returns_at_once_and_wait_for_version_waits_for_the_swap() -> None:
    builder = GatedBuilder()
    swap = _swap(builder)
    start = time.monotonic()
    assert swap.offer(1, _set(1))
    assert time.monotonic() - start < WAIT_S / 2  # did not wait for the (blocked) build
    waiter = {}
    t = threading.Thread(target=lambda: waiter.update(ok=swap.wait_for_version(1, WAIT_S)))
    t.start()
    builder.wait_started(1)
    assert swap.run(lambda value: value.version_hint) == (0, 0)  # predictions go on with v0
    builder.gate(1).set()
    t.join(WAIT_S)
    assert waiter == {"ok": True}
    assert swap.run(lambda value: value.version_hint) == (1, 1)
    swap.close()


def test_partial_updates_merge_onto_the_accepted_state_not_the_one_in_force() -> None:
    builder = GatedBuilder()
    swap = _swap(builder)
    assert swap.offer(1, _set(1, a="A"))
    builder.wait_started(1)
    assert swap.offer(2, _set(2, b="B"))  # arrives while v1 is not yet in force
    builder.gate(1).set()
    builder.gate(2).set()
    assert swap.wait_for_version(2, WAIT_S)
    assert swap.state() == {"v": 2, "a": "A", "b": "B"}
    swap.close()


def test_old_values_are_released_by_the_builder_once_no_run_uses_them() -> None:
    builder = GatedBuilder()
    swap = _swap(builder)
    entered, leave = threading.Event(), threading.Event()
    seen = {}

    def slow_run(value: Value) -> int:
        value.running += 1
        entered.set()
        leave.wait(WAIT_S)
        value.running -= 1
        return value.version_hint

    t = threading.Thread(target=lambda: seen.update(out=swap.run(slow_run)), name="predictor")
    t.start()
    assert entered.wait(WAIT_S)
    old = swap.run(lambda v: v)[0]  # the v0 value (a quick run alongside the slow one)
    builder.gate(1).set()
    assert swap.offer(1, _set(1)) and swap.wait_for_version(1, WAIT_S)
    time.sleep(0.05)
    assert old.released_by is None  # the slow run is still on it
    leave.set()
    t.join(WAIT_S)
    assert seen["out"] == (0, 0)  # the run reports the version it ran with
    deadline = time.monotonic() + WAIT_S
    while old.released_by is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert old.released_by == "test-swap" and not old.released_while_running  # the builder, not the predictor
    swap.close()
    assert builder.built[-1].released_by is not None  # close releases the value in force


def test_a_failed_build_keeps_the_value_in_force_and_a_resend_is_accepted() -> None:
    calls = []

    def build(state: dict) -> Value:
        calls.append(state["v"])
        if len(calls) == 1:
            raise RuntimeError("no room for a session")
        return Value(state, state["v"])

    swap = _swap(build)
    assert swap.offer(1, _set(1))
    deadline = time.monotonic() + WAIT_S
    while swap.stats().failed == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert swap.version == 0 and swap.accepted_version == 0  # rolled back: nothing newer was pending
    assert swap.offer(1, _set(1)) and swap.wait_for_version(1, WAIT_S)
    assert swap.stats().failed == 1 and calls == [1, 1]
    swap.close()


def test_synchronous_mode_builds_in_the_caller_and_versions_still_only_go_up() -> None:
    in_force: list[int] = []
    lock = threading.Lock()

    def build(state: dict) -> Value:
        time.sleep(0.002)
        return Value(state, state["v"])

    swap = _swap(build, background=False)
    swap.add_listener(lambda v: (lock.acquire(), in_force.append(v), lock.release()))
    assert swap.offer(1, _set(1)) and swap.version == 1  # in force when offer returns
    versions = iter(range(2, 62))
    take = threading.Lock()

    def updater() -> None:
        while True:
            with take:
                v = next(versions, None)
            if v is None:
                return
            swap.offer(v, _set(v))
            assert swap.version >= v  # a synchronous offer returns with its version (or newer) in force

    threads = [threading.Thread(target=updater) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert swap.version == 61 and in_force == sorted(in_force) and len(set(in_force)) == len(in_force)
    swap.close()


def test_a_closed_swap_refuses_updates_and_runs() -> None:
    swap = _swap(lambda state: Value(state, state["v"]))
    swap.close()
    swap.close()
    with pytest.raises(RuntimeError, match="closed"):
        swap.offer(1, _set(1))
    with pytest.raises(RuntimeError, match="closed"):
        swap.run(lambda v: v)
