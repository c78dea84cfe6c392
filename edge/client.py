"""The edge's side of the ``fedshift.v1.EdgeService`` contract: register, upload, subscribe.

Why retries live here: an edge on a flaky link must neither lose nor double-count an upload.
Transient failures (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``) are retried
with exponential backoff and jitter, bounded in attempts and total time, re-sending the *same*
sequence number so the cloud acknowledges a repeat as a duplicate instead of queueing it twice.
Beyond that bound the edge's upload buffer (:mod:`edge.uploader`) keeps the upload and tries again.
Anything else (``INVALID_ARGUMENT``, ``UNAUTHENTICATED``, ...) is a bug or a misconfiguration and
raises at once.

:class:`Subscriber` is a daemon thread that consumes the ``Subscribe`` stream and hands each newer
normalization state to ``EdgeRuntime.apply``, which returns at once and swaps the rebuilt session in
atomically when it is ready, so inference never waits for the cloud. It reconnects with backoff,
resuming after the newest version the runtime accepted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import grpc
import numpy as np

from edge.summary import Latency, SubscriberStats
from protos.codec import GRPC_OPTIONS, RETRY_AFTER_KEY, decode_state, encode_array
from protos.contract import check_images, file_sha256  # noqa: F401 - file_sha256 re-exported: the hash registration sends
from protos.fedshift.v1 import edge_pb2 as pb
from protos.fedshift.v1 import edge_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})
# a subscription that fails with one of these will not get better by reconnecting
FATAL_STREAM = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                          grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED,
                          grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION})

R = TypeVar("R")


def _retry_after(exc: grpc.RpcError) -> float:
    """The wait, seconds, a RESOURCE_EXHAUSTED answer asks for (its retry-after-ms metadata; 0: none)."""
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - not every RpcError carries metadata
        return 0.0
    for key, value in metadata:
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, min(float(value) / 1000.0, 60.0))  # a hostile hint cannot stall us
            except (TypeError, ValueError):
                return 0.0
    return 0.0


def not_registered(exc: BaseException) -> bool:
    """The cloud answered that it does not know this edge: it restarted (or forgot it); the
    edge registers again and carries on."""
    return (isinstance(exc, grpc.RpcError) and status_code(exc) == grpc.StatusCode.FAILED_PRECONDITION
            and "not registered" in _details(exc))


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by attempts and by total time."""

    max_attempts: int = 8
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each delay is scaled by a factor drawn from [1 - jitter, 1 + jitter]
    max_total_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or self.multiplier < 1 \
                or not 0 <= self.jitter < 1 or self.max_total_s < 0:
            raise ValueError(f"invalid retry policy {self}")

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry)
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)


class RetriesExhausted(RuntimeError):
    """A transient failure outlasted the retry policy; ``code`` is the last status."""

    def __init__(self, what: str, code: grpc.StatusCode, attempts: int, details: str) -> None:
        super().__init__(f"{what}: gave up after {attempts} attempts, last status {code.name}: {details}")
        self.code, self.attempts = code, attempts


@dataclass(frozen=True)
class UploadResult:
    """One acknowledged upload: the reply, the request's serialized size, attempts made."""

    reply: pb.UploadReply
    request_bytes: int
    attempts: int


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status of a failed call (``UNKNOWN`` when it carries none)."""
    code = exc.code() if hasattr(exc, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details(exc: grpc.RpcError) -> str:
    return (exc.details() if hasattr(exc, "details") else "") or ""


class CloudClient:
    """A gRPC channel to the cloud's EdgeService for one edge (64 MiB message limits)."""

    def __init__(self, address: str, edge_id: str, token: str = "", timeout: float = 10.0, *,
                 connect_timeout: float = 60.0, retry: RetryPolicy = RetryPolicy(), seed: int | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        if not edge_id:
            raise ValueError("edge_id must not be empty")
        self.address, self.edge_id, self.token = address, edge_id, token
        self.timeout, self.connect_timeout, self.retry = float(timeout), float(connect_timeout), retry
        self._rng = random.Random(seed)
        self._sleep = sleep
        # TLS when given channel credentials (protos.tls.channel_credentials); plaintext otherwise
        self.channel = (grpc.secure_channel(address, credentials, options=list(GRPC_OPTIONS)) if credentials is not None
                        else grpc.insecure_channel(address, options=list(GRPC_OPTIONS)))
        self.stub = pb_grpc.EdgeServiceStub(self.channel)
        self.max_message_bytes = 0  # the server's bound, known after register()

    # ---------------------------------------------------------------- plumbing

    def call(self, what: str, fn: Callable[..., R], request: object, *, timeout: float | None = None,
             wait_for_ready: bool = False, log_level: int = logging.WARNING) -> tuple[R, int]:
        """Call a unary RPC with the retry policy; returns (reply, attempts). Each retry is logged at
        ``log_level`` (the upload buffer lowers it during an outage it already reported)."""
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = fn(request, timeout=timeout or self.timeout, wait_for_ready=wait_for_ready)
                return reply, attempt
            except grpc.RpcError as exc:
                code = status_code(exc)
                if code not in RETRYABLE:
                    raise
                delay = max(self.retry.delay(attempt - 1, self._rng), _retry_after(exc))
                if attempt >= self.retry.max_attempts or time.monotonic() - start + delay > self.retry.max_total_s:
                    raise RetriesExhausted(what, code, attempt, _details(exc)) from exc
                log.log(log_level, "%s: %s (%s), retry %d in %.2fs", what, code.name, _details(exc), attempt, delay)
                self._sleep(delay)

    # ---------------------------------------------------------------- RPCs

    def register(self, runtime) -> pb.RegisterReply:
        """Announce this edge and its model; returns the cloud's version and next sequence.

        Waits up to ``connect_timeout`` for the cloud to come up (edges may start first), then
        retries transient failures like any call.
        """
        request = pb.RegisterRequest(edge_id=self.edge_id, model_id=runtime.model_name,
                                     model_sha256=runtime.sha256, auth_token=self.token,
                                     norm_names=list(runtime.norm_names))
        reply, _ = self.call("register", self.stub.Register, request, timeout=self.connect_timeout,
                             wait_for_ready=True)
        self.max_message_bytes = int(reply.max_message_bytes)
        log.info("registered %s at %s: cloud version %d, next sequence %d", self.edge_id, self.address,
                 reply.version, reply.next_sequence)
        return reply

    def upload(self, images: np.ndarray, entropies: np.ndarray, sequence: int, *,
               labels: np.ndarray | None = None, edge_version: int = 0, seen: int = 0,
               episode: int = 0, quiet: bool = False) -> UploadResult:
        """Upload one batch of selected uint8 images under ``sequence`` (re-sent unchanged on retry);
        ``quiet`` logs the retries at debug level only."""
        images = check_images(np.asarray(images), "uploads")  # the cloud's rule: refused here, not there
        n = len(images)
        if len(entropies) != n or (labels is not None and len(labels) != n):
            raise ValueError(f"{n} images but {len(entropies)} entropies / "
                             f"{None if labels is None else len(labels)} labels")
        request = pb.UploadRequest(
            edge_id=self.edge_id, sequence=int(sequence), images=encode_array(images, "images"),
            entropies=np.asarray(entropies, np.float32).tolist(),
            labels=[] if labels is None else np.asarray(labels, np.int64).tolist(),
            edge_version=int(edge_version), auth_token=self.token, seen=int(seen), episode=int(episode),
        )
        size = request.ByteSize()
        limit = self.max_message_bytes or 0
        if limit and size > limit:
            raise ValueError(f"upload of {n} samples is {size} bytes, over the server's limit of {limit}: "
                             "lower the batch size")
        reply, attempts = self.call(f"upload #{sequence}", self.stub.Upload, request,
                                    log_level=logging.DEBUG if quiet else logging.WARNING)
        if reply.duplicate:
            log.info("upload #%d was already received by the cloud (acknowledged as duplicate)", sequence)
        return UploadResult(reply, size, attempts)

    def report_metrics(self, step: int, values: Mapping[str, float]) -> None:
        """Best-effort monitoring: one attempt, errors propagate to the caller to count."""
        request = pb.MetricsReport(edge_id=self.edge_id, step=int(step), auth_token=self.token,
                                   values={k: float(v) for k, v in values.items()})
        self.stub.ReportMetrics(request, timeout=self.timeout)

    def reset(self, episode: int) -> pb.ResetReply:
        """Start episode ``episode``: the cloud restores this edge's initial state as a new version."""
        request = pb.ResetRequest(edge_id=self.edge_id, episode=int(episode), auth_token=self.token)
        reply, _ = self.call(f"reset to episode {episode}", self.stub.Reset, request)
        return reply

    def subscribe(self, runtime, *, episode: int = 0) -> "Subscriber":
        """Start a :class:`Subscriber` applying updates to ``runtime``."""
        sub = Subscriber(self, runtime, episode=episode)
        sub.start()
        return sub

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Subscriber(threading.Thread):
    """Consumes ``Subscribe`` and applies newer normalization states; stop with :meth:`close`.

    Updates of an episode older than :attr:`episode` (set by the node before it resets) are
    ignored, as are versions not newer than the newest the runtime accepted. Counters are read with
    :meth:`stats` from any thread.
    """

    def __init__(self, client: CloudClient, runtime, *, episode: int = 0,
                 retry: RetryPolicy | None = None) -> None:
        super().__init__(name=f"subscriber-{client.edge_id}", daemon=True)
        self.client, self.runtime = client, runtime
        self.retry = retry or client.retry
        self._episode = int(episode)
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._call: grpc.Future | None = None
        self._rng = random.Random(client._rng.random())
        self.error: BaseException | None = None
        self._counts = {"updates_received": 0, "versions_applied": 0, "stale_ignored": 0,
                        "episode_ignored": 0, "apply_errors": 0, "bytes_down": 0, "reconnects": 0}
        self._latencies: list[float] = []
        self._created: dict[int, float] = {}  # accepted, not yet in force: version -> cloud step time
        self._remove_listener = runtime.add_version_listener(self._in_force)

    @property
    def episode(self) -> int:
        with self._lock:
            return self._episode

    @episode.setter
    def episode(self, value: int) -> None:
        with self._lock:
            self._episode = int(value)

    def stats(self) -> SubscriberStats:
        """A snapshot of the counters plus update latency (cloud step done -> in force here; a
        version superseded by a newer one before its build finished is not timed)."""
        with self._lock:
            counts = dict(self._counts)
            lat = list(self._latencies)
        latency = Latency(len(lat), float(np.mean(lat)) if lat else None, float(np.max(lat)) if lat else None)
        return SubscriberStats(**counts, update_latency_s=latency)

    def latencies(self) -> list[float]:
        """Every update latency measured so far, seconds (benchmarks take medians of them)."""
        with self._lock:
            return list(self._latencies)

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until a version >= ``version`` is in force — predictions use it, not merely
        accepted by ``apply`` (tests, launch barriers, lockstep simulations)."""
        return self.runtime.wait_for_version(version, timeout)

    def run(self) -> None:
        retries = 0
        while not self._stop_event.is_set():
            try:
                request = pb.SubscribeRequest(edge_id=self.client.edge_id,
                                              after_version=self.runtime.latest_version, auth_token=self.client.token)
                call = self.client.stub.Subscribe(request)
                with self._lock:
                    self._call = call
                if self._stop_event.is_set():  # close() ran before the call existed
                    call.cancel()
                for update in call:
                    retries = 0
                    self._handle(update)
                code, details = grpc.StatusCode.OK, "stream ended"
            except grpc.RpcError as exc:
                code, details = status_code(exc), _details(exc)
            if self._stop_event.is_set():
                break
            if code == grpc.StatusCode.FAILED_PRECONDITION and "not registered" in details:
                log.warning("subscription: the cloud does not know this edge (restarted?); retrying while the "
                            "edge registers again")
            elif code in FATAL_STREAM:
                log.error("subscription refused (%s: %s): no more parameter updates", code.name, details)
                self.error = RuntimeError(f"subscribe: {code.name}: {details}")
                break
            delay = self.retry.delay(min(retries, 30), self._rng)
            retries += 1
            log.warning("subscription lost (%s: %s), reconnecting in %.2fs", code.name, details, delay)
            with self._lock:
                self._counts["reconnects"] += 1
            self._stop_event.wait(delay)

    def _handle(self, update: pb.ParameterUpdate) -> None:
        with self._lock:
            self._counts["updates_received"] += 1
            self._counts["bytes_down"] += update.ByteSize()
            episode = self._episode
        if update.episode < episode:
            self._bump("episode_ignored")
            log.debug("ignoring update v%d of episode %d (now %d)", update.version, update.episode, episode)
            return
        version = int(update.version)
        if update.created_unix:  # before apply: a synchronous runtime puts it in force inside the call
            with self._lock:
                self._created[version] = float(update.created_unix)
        try:
            applied = self.runtime.apply(decode_state(update.tensors), version)
        except ValueError as exc:
            self._forget(version)
            self._bump("apply_errors")
            log.error("refusing update v%d: %s", update.version, exc)
            return
        if not applied:
            self._forget(version)
            self._bump("stale_ignored")
            return
        self._bump("versions_applied")
        log.debug("accepted v%d (episode %d, cloud step %d)", update.version, update.episode, update.cloud_step)

    def _in_force(self, version: int) -> None:
        """Runtime listener: ``version`` is in force; time it, forget the older ones it superseded."""
        now = time.time()
        with self._lock:
            created = self._created.pop(version, None)
            for v in [v for v in self._created if v < version]:
                del self._created[v]
            if created is not None:
                self._latencies.append(now - created)

    def _forget(self, version: int) -> None:
        with self._lock:
            self._created.pop(version, None)

    def _bump(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def close(self, timeout: float = 5.0) -> None:
        """Cancel the stream and join the thread."""
        self._stop_event.set()
        self._remove_listener()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if self.is_alive():
            self.join(timeout)
            if self.is_alive():
                log.warning("subscriber thread did not stop within %.1fs", timeout)

