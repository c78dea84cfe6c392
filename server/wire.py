"""The EdgeService's gRPC method handlers, decoding requests ourselves. One job.

gRPC's generated ``add_EdgeServiceServicer_to_server`` decodes each request before our code runs;
an undecodable one is answered ``INTERNAL`` and logged by grpc with a full traceback, every time
— a cheap way for garbage from the network to fill a board's or a server's disk. Here the
handlers take the raw bytes, decode them with the generated message classes, and answer an
undecodable message ``INVALID_ARGUMENT`` (it is the caller's fault) with one rate-limited log line
(:class:`RateLimitedLog`). The method table comes from the service descriptor of the committed
stubs, so it cannot drift from the proto; the stubs themselves are never edited.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

from protos.fedshift.v1 import edge_pb2 as pb

log = logging.getLogger(__name__)


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


def add_edge_service(server: grpc.Server, servicer: Any, undecodable: RateLimitedLog) -> None:
    """Register ``servicer``'s EdgeService methods on ``server`` with our own request decoding."""
    service = pb.DESCRIPTOR.services_by_name["EdgeService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        reply_cls = getattr(pb, method.output_type.name)
        fn = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(fn, request_cls, method.name, undecodable), response_serializer=reply_cls.SerializeToString)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(fn, request_cls, method.name, undecodable), response_serializer=reply_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _decode(raw: bytes, request_cls: Any, method: str, undecodable: RateLimitedLog,
            context: grpc.ServicerContext) -> Any:
    try:
        return request_cls.FromString(raw)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        undecodable.record(f"{method} from {context.peer()}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable {request_cls.__name__} ({len(raw)} bytes)")


def _unary(fn: Callable, request_cls: Any, method: str, undecodable: RateLimitedLog) -> Callable:
    def handle(raw: bytes, context: grpc.ServicerContext) -> Any:
        return fn(_decode(raw, request_cls, method, undecodable, context), context)
    return handle


def _streaming(fn: Callable, request_cls: Any, method: str, undecodable: RateLimitedLog) -> Callable:
    def handle(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
        yield from fn(_decode(raw, request_cls, method, undecodable, context), context)
    return handle
