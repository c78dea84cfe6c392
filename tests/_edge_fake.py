"""Test helpers for the edge: a tiny in-process fake cloud and a tiny exported model.

The fake implements the wire contract just enough to check the edge's behaviour: it can fail the
first N uploads with a status (optionally after recording them, as if the reply were lost), it
de-duplicates by (edge_id, sequence) like the real cloud must, and it lets a test push
ParameterUpdates to subscribers.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np

from protos.codec import GRPC_OPTIONS, MAX_MESSAGE_BYTES, decode_images, encode_state
from protos.fedshift.v1 import edge_pb2 as pb
from protos.fedshift.v1 import edge_pb2_grpc as pb_grpc


class FakeCloud(pb_grpc.EdgeServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fail_uploads = 0  # fail this many upload attempts ...
        self.fail_code = grpc.StatusCode.UNAVAILABLE  # ... with this status
        self.record_then_fail = False  # True: the cloud got it, the reply was "lost"
        self.upload_attempts: list[int] = []  # sequence of every attempt that reached us
        self.accepted: dict[tuple[str, int], int] = {}  # (edge, seq) -> samples, counted once
        self.request_bytes: dict[tuple[str, int], int] = {}
        self.episodes_seen: list[int] = []
        self.labels_seen = 0
        self.resets: list[tuple[str, int]] = []
        self.registered: list[pb.RegisterRequest] = []
        self.metrics: list[pb.MetricsReport] = []
        self.version = 0
        self.subscribers: list[queue.Queue] = []
        self.subscribe_requests: list[pb.SubscribeRequest] = []
        self.initial_state: dict[str, np.ndarray] | None = None
        self.token = ""
        self.step_on_upload: dict[str, np.ndarray] | None = None  # publish a "cloud step" per upload
        self.step_delay_s = 0.05
        self.known: set[str] = set()  # registered edges; forget() empties it, as a restart does
        self.require_registration = False  # True: uploads / resets of unknown edges are refused, as the cloud does
        self.unregistered_uploads: list[int] = []  # sequences refused because the edge was unknown

    def forget(self) -> None:
        """A cloud restart without state: every edge must register again."""
        with self.lock:
            self.known.clear()
            self.require_registration = True

    def _registered(self, edge_id: str, context, sequence: int | None = None) -> None:
        with self.lock:
            unknown = self.require_registration and edge_id not in self.known
            if unknown and sequence is not None:
                self.unregistered_uploads.append(sequence)
        if unknown:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"edge {edge_id!r} is not registered; call Register first")

    def _auth(self, token: str, context) -> None:
        if self.token and token != self.token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

    def Register(self, request, context):  # noqa: N802 - gRPC naming
        self._auth(request.auth_token, context)
        with self.lock:
            self.registered.append(request)
            self.known.add(request.edge_id)
            nxt = 1 + max((s for (e, s) in self.accepted if e == request.edge_id), default=0)
            return pb.RegisterReply(version=self.version, next_sequence=nxt, max_message_bytes=MAX_MESSAGE_BYTES)

    def Upload(self, request, context):  # noqa: N802
        self._auth(request.auth_token, context)
        self._registered(request.edge_id, context, request.sequence)
        try:
            images = decode_images(request.images)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        key = (request.edge_id, request.sequence)
        with self.lock:
            self.upload_attempts.append(request.sequence)
            fail = self.fail_uploads > 0
            if fail:
                self.fail_uploads -= 1
            duplicate = key in self.accepted
            if not duplicate and (not fail or self.record_then_fail):
                self.accepted[key] = len(images)
                self.request_bytes[key] = request.ByteSize()
                self.episodes_seen.append(request.episode)
                self.labels_seen += len(request.labels)
        if fail:
            context.abort(self.fail_code, "injected failure")
        if self.step_on_upload is not None and not duplicate:
            with self.lock:
                self.version += 1
                version = self.version
            threading.Timer(self.step_delay_s, self.publish,
                            (self.step_on_upload, version, request.episode)).start()
        return pb.UploadReply(sequence=request.sequence, duplicate=duplicate, accepted=0 if duplicate else len(images),
                              latest_version=self.version)

    def Subscribe(self, request, context):  # noqa: N802
        self._auth(request.auth_token, context)
        q: queue.Queue = queue.Queue()
        with self.lock:
            self.subscribers.append(q)
            self.subscribe_requests.append(request)
        try:
            while context.is_active():
                try:
                    update = q.get(timeout=0.05)
                except queue.Empty:
                    continue
                yield update
        finally:
            with self.lock:
                self.subscribers.remove(q)

    def ReportMetrics(self, request, context):  # noqa: N802
        with self.lock:
            self.metrics.append(request)
        return pb.MetricsAck()

    def Reset(self, request, context):  # noqa: N802
        self._auth(request.auth_token, context)
        self._registered(request.edge_id, context)
        with self.lock:
            self.resets.append((request.edge_id, request.episode))
            self.version += 1
            version = self.version
        if self.initial_state is not None:
            self.publish(self.initial_state, version, episode=request.episode)
        return pb.ResetReply(version=version, episode=request.episode)

    # ------------------------------------------------------------ test side

    def publish(self, state: dict[str, np.ndarray], version: int, episode: int = 0) -> pb.ParameterUpdate:
        update = pb.ParameterUpdate(version=version, tensors=encode_state(state), created_unix=time.time(),
                                    cloud_step=version, episode=episode)
        with self.lock:
            targets = list(self.subscribers)
        for q in targets:
            q.put(update)
        return update

    def wait_subscribers(self, n: int = 1, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.subscribers) >= n:
                    return
            time.sleep(0.01)
        raise TimeoutError(f"{n} subscriber(s) did not connect")


@contextlib.contextmanager
def serve(fake: FakeCloud, port: int = 0) -> Iterator[str]:
    """Run ``fake`` on 127.0.0.1:<port> (0: a free one); yields the address; always stops the server."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=list(GRPC_OPTIONS))
    pb_grpc.add_EdgeServiceServicer_to_server(fake, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    if port == 0:
        raise RuntimeError("could not bind the fake cloud")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(5)


def export_tiny_model(path: Path, num_classes: int = 4, size: int = 8, seed: int = 0) -> Path:
    """A small BN CNN with non-trivial statistics, exported like a real edge model (tests only)."""
    import torch

    from core.export import export_onnx
    from core.models import create_model

    torch.manual_seed(seed)
    model = create_model("edge_cnn", num_classes, image_size=size, width=8)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size))
    export_onnx(model.eval(), path, (3, size, size), model_name="edge_cnn_tiny")
    return path


def perturbed(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A random but valid normalization state (positive variances)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in state.items():
        scale = rng.uniform(0.5, 2.0, v.shape) if k.endswith("running_var") else rng.uniform(0.5, 1.5, v.shape)
        out[k] = (v * scale + (0 if k.endswith("running_var") else rng.normal(0, 0.2, v.shape))).astype(np.float32)
    return out
