"""A live cloud under 10,000 malformed and hostile-but-well-formed messages (issue 12, item 2):
every answer is a status code that names the caller's fault (never INTERNAL / UNKNOWN), the log
gets one rate-limited line for undecodable bytes instead of a traceback each, memory stays
bounded, and afterwards a well-formed edge is served correctly."""

from __future__ import annotations

import logging
import os
import resource

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.cema import CemaConfig
from core.export import Preprocess
from core.models import create_model
from protos.codec import GRPC_OPTIONS, encode_array
from protos.fedshift.v1 import edge_pb2 as pb
from protos.fedshift.v1 import edge_pb2_grpc as pb_grpc
from server.cloud import CloudConfig, CloudServer

SIZE = 16
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.UNIMPLEMENTED}
METHODS = ("Register", "Upload", "ReportMetrics", "Reset")


@pytest.fixture(scope="module")
def live():
    torch.manual_seed(0)
    student = create_model("edge_cnn", 10, image_size=SIZE, width=8).eval()
    teacher = create_model("teacher_resnet", 10, image_size=SIZE, width=8, blocks=1).eval()
    cfg = CloudConfig(image_size=SIZE, cema=CemaConfig(batch_size=4, replay_start=8), rate_interval_s=0.0, port=0,
                      insecure=True, max_backlog=256, max_edges=8)
    server = CloudServer(student, teacher, cfg, preprocess=Preprocess()).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=GRPC_OPTIONS)
    raw = {m: channel.unary_unary(f"/fedshift.v1.EdgeService/{m}", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b) for m in METHODS}
    stub = pb_grpc.EdgeServiceStub(channel)
    stub.Register(pb.RegisterRequest(edge_id="fuzz"), timeout=10)
    yield server, raw, stub
    channel.close()
    server.stop(grace=0.5)


def _status(call, request) -> grpc.StatusCode:
    try:
        call(request, timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_DTYPES = st.sampled_from([int(v) for v in pb.DType.values()] + [7, 99])  # open enum: unknown values arrive
_tensor = st.builds(
    lambda shape, dtype, data: pb.Tensor(name="images", shape=shape, dtype=dtype, data=data),
    st.lists(st.integers(-3, 2**40), max_size=5),  # int64 shape: negative and huge dims arrive
    _DTYPES,
    st.one_of(st.binary(max_size=512), st.just(np.zeros((2, SIZE, SIZE, 3), np.uint8).tobytes())),
)
_upload = st.builds(
    lambda edge, seq, tensor, ent, labels, episode: pb.UploadRequest(
        edge_id=edge, sequence=seq, images=tensor, entropies=ent, labels=labels, episode=episode),
    st.sampled_from(["fuzz", "", "nobody", "x" * 300]),
    st.integers(0, 2**64 - 1),  # uint64 sequence
    _tensor,
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=4),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
    st.integers(0, 2**32 - 1),  # uint32 episode
)


def test_ten_thousand_hostile_messages(live, caplog) -> None:
    server, raw, stub = live
    rng = np.random.default_rng(0)
    seen: dict[grpc.StatusCode, int] = {}
    caplog.set_level(logging.WARNING)
    rss_before = _rss_mb()
    # 1. bytes: random, and truncated / bit-flipped valid requests
    valid = pb.UploadRequest(edge_id="fuzz", sequence=1, images=encode_array(
        np.zeros((2, SIZE, SIZE, 3), np.uint8))).SerializeToString()
    for i in range(6000):
        kind = i % 3
        if kind == 0:
            data = os.urandom(int(rng.integers(1, 200)))
        elif kind == 1:
            data = valid[: int(rng.integers(1, len(valid)))]
        else:
            b = bytearray(valid)
            for j in rng.integers(0, len(b), 4):
                b[j] ^= int(rng.integers(1, 256))
            data = bytes(b)
        code = _status(raw[METHODS[i % len(METHODS)]], data)
        seen[code] = seen.get(code, 0) + 1
    # 2. well-formed but hostile uploads (hypothesis), 4,000 of them
    hostile: list[grpc.StatusCode] = []

    @settings(max_examples=4000, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(_upload)
    def send(request: pb.UploadRequest) -> None:
        hostile.append(_status(stub.Upload, request))

    send()
    for code in hostile:
        seen[code] = seen.get(code, 0) + 1
    assert sum(seen.values()) >= 10_000
    bad = {c: n for c, n in seen.items() if c not in ALLOWED | {grpc.StatusCode.OK}}
    assert not bad, f"codes that blame the server: {bad} (all: {seen})"
    # the log: a few rate-limited lines, no tracebacks
    assert not [r for r in caplog.records if r.exc_info], "a traceback reached the log"
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) <= 5
    assert len([r for r in caplog.records if "refused uploads" in r.getMessage()]) <= 5
    assert len(caplog.records) <= 30, [r.getMessage() for r in caplog.records[:40]]
    assert server.undecodable.total > 1000 and server.service.refused.total > 500
    assert len(server.service.stats().edges) <= 8  # random edge ids cannot grow the learners past max_edges
    # bounded: no growth beyond a generous margin, and the backlog bound held
    assert _rss_mb() - rss_before < 400
    assert server.service.stats().samples <= 10 * 10_000
    # and a well-formed edge is served as before
    stub.Register(pb.RegisterRequest(edge_id="good"), timeout=10)
    images = np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    reply = stub.Upload(pb.UploadRequest(edge_id="good", sequence=0, images=encode_array(images),
                                         entropies=[0.5] * 4), timeout=10)
    assert reply.accepted == 4
    update = next(stub.Subscribe(pb.SubscribeRequest(edge_id="good"), timeout=30))
    assert update.version >= 1
