"""The EdgeService's gRPC transport: an asyncio server, our own request decoding, and the
small contract between the transport and the service. One job: bytes in, status codes out.

Why asyncio (``grpc.aio``): a synchronous gRPC server holds one thread per open ``Subscribe``
stream, so a cloud serving 1,000 edges needed 1,000 threads. Here a stream is a coroutine waiting
on an :class:`asyncio.Event` that the learner's thread sets after each publication, and unary
calls run the service's plain, blocking methods on a bounded thread pool: the thread count no
longer grows with the edges. :class:`AsyncServer` runs the event loop on its own thread, so the
cloud keeps a synchronous ``start``/``stop`` API.

Why our own decoding: gRPC's generated ``add_EdgeServiceServicer_to_server`` decodes each request
before our code runs; an undecodable one is answered ``INTERNAL`` and logged by grpc with a full
traceback, every time — a cheap way for garbage from the network to fill a disk. Here the
handlers take the raw bytes, decode them with the generated message classes, and answer an
undecodable message ``INVALID_ARGUMENT`` (it is the caller's fault) with one rate-limited log line
(:class:`RateLimitedLog`). The method table comes from the service descriptor of the committed
stubs, so it cannot drift from the proto; the stubs themselves are never edited.

The service's side of the contract: a unary method ``fn(request, call) -> reply`` runs on a pool
thread and refuses with ``call.abort(code, details)`` (a :class:`Refusal`, turned into the
status here); a server-streaming method returns an :class:`UpdateStream`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

import grpc
from google.protobuf.message import DecodeError

from protos.fedshift.v1 import edge_pb2 as pb

log = logging.getLogger(__name__)


class Refusal(Exception):
    """A call refused by the service: the status, what was wrong, and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


class Call:
    """What a service method sees of its call, on a pool thread (the subset of
    ``grpc.ServicerContext`` the service uses; ``abort`` raises :class:`Refusal`)."""

    def __init__(self, peer: str = "", auth_context: dict | None = None) -> None:
        self._peer, self._auth = peer, dict(auth_context or {})
        self._trailing: tuple = ()

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        return self._auth

    def set_trailing_metadata(self, metadata: tuple) -> None:
        self._trailing = tuple(metadata)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Refusal(code, details, self._trailing)


class UpdateStream(Protocol):
    """What a server-streaming method returns: polled on the event loop, never blocking."""

    def poll(self) -> Any | None:
        """The next message to send, or ``None`` when there is none yet."""

    @property
    def ended(self) -> bool:
        """True once the stream should end (the service is stopping)."""

    def watch(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (from any thread) whenever :meth:`poll` may have something or the stream ended."""

    def close(self) -> None:
        """The call is over (finished, cancelled or failed): forget ``wake``."""


class RateLimitedLog:
    """One kind of event from the network (undecodable messages, refused uploads): counted, and
    logged at most once per ``interval_s`` with the count since the last line, so a flood costs a
    few lines, not one per message."""

    def __init__(self, what: str, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.what, self.interval_s = what, interval_s
        self._clock, self._log = clock, logger
        self._lock = threading.Lock()
        self.total = 0
        self._unlogged = 0
        self._last = -float("inf")

    def record(self, detail: str) -> None:
        with self._lock:
            self.total += 1
            self._unlogged += 1
            now = self._clock()
            if now - self._last < self.interval_s:
                return
            count, self._unlogged, self._last = self._unlogged, 0, now
        self._log.warning("%s: %s (%d since the last such line, %d in all; at most one line per %g s)", self.what,
                          detail[:200], count, self.total, self.interval_s)


def add_edge_service(server: grpc.aio.Server, servicer: Any, undecodable: RateLimitedLog,
                     executor: ThreadPoolExecutor) -> None:
    """Register ``servicer``'s EdgeService methods on an asyncio ``server`` with our own request
    decoding; unary methods run on ``executor``."""
    service = pb.DESCRIPTOR.services_by_name["EdgeService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        reply_cls = getattr(pb, method.output_type.name)
        fn = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(fn, request_cls, method.name, undecodable, executor),
                response_serializer=reply_cls.SerializeToString)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(fn, request_cls, method.name, undecodable, executor),
                response_serializer=reply_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


async def _decode(raw: bytes, request_cls: Any, method: str, undecodable: RateLimitedLog,
                  context: grpc.aio.ServicerContext) -> Any:
    try:
        return request_cls.FromString(raw)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        undecodable.record(f"{method} from {context.peer()}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable {request_cls.__name__} ({len(raw)} bytes)")


async def _run(fn: Callable, request: Any, context: grpc.aio.ServicerContext, executor: ThreadPoolExecutor) -> Any:
    """``fn(request, call)`` on the pool; a :class:`Refusal` becomes the call's status."""
    call = Call(context.peer(), context.auth_context())
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, request, call)
    except Refusal as refusal:
        if refusal.trailing_metadata:
            context.set_trailing_metadata(refusal.trailing_metadata)
        await context.abort(refusal.code, refusal.details)


def _unary(fn: Callable, request_cls: Any, method: str, undecodable: RateLimitedLog,
           executor: ThreadPoolExecutor) -> Callable:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await _run(fn, await _decode(raw, request_cls, method, undecodable, context), context, executor)
    return handle


def _streaming(fn: Callable, request_cls: Any, method: str, undecodable: RateLimitedLog,
               executor: ThreadPoolExecutor) -> Callable:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext):
        stream: UpdateStream = await _run(fn, await _decode(raw, request_cls, method, undecodable, context),
                                          context, executor)
        loop, event = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

        stream.watch(wake)
        try:
            while not stream.ended:
                event.clear()
                message = stream.poll()
                if message is None:
                    await event.wait()
                    continue
                yield message
        finally:
            stream.close()
    return handle


class AsyncServer:
    """A ``grpc.aio`` server on an event loop of its own thread, driven synchronously."""

    def __init__(self, options: Any, maximum_concurrent_rpcs: int | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cloud-rpc-loop", daemon=True)
        self._thread.start()
        self.server: grpc.aio.Server = self.run(self._create(options, maximum_concurrent_rpcs))

    @staticmethod
    async def _create(options: Any, maximum_concurrent_rpcs: int | None) -> grpc.aio.Server:
        return grpc.aio.server(options=options, maximum_concurrent_rpcs=maximum_concurrent_rpcs)

    def run(self, coroutine: Any, timeout: float | None = None) -> Any:
        """Run ``coroutine`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run a plain function on the loop's thread (grpc.aio objects belong to it)."""
        async def wrapper() -> Any:
            return fn()
        return self.run(wrapper())

    def start(self) -> None:
        self.run(self.server.start())

    def stop(self, grace: float | None) -> None:
        self.run(self.server.stop(grace))

    def wait(self, timeout: float | None) -> bool:
        """Block until the server terminated (True) or ``timeout`` passed (False)."""
        return bool(self.run(self.server.wait_for_termination(timeout)))

    def close(self) -> None:
        """Stop the loop and join its thread (after :meth:`stop`)."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
