"""Tests for core.streams: segment order, reset protocols, batching, passes/limit, validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from core import streams
from core.corruptions import corrupt
from core.streams import CorruptedStream, Segment, StreamBatch, build_stream

N = 10
NAMES = ("gaussian_noise", "contrast", "fog")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16] / 16
    images = np.stack([
        np.clip((rng.uniform(0.2, 0.8, 3) + rng.uniform(-0.3, 0.3, 3) * xx[..., None]
                 + rng.uniform(-0.3, 0.3, 3) * yy[..., None]) * 255, 0, 255)
        for _ in range(N)]).astype(np.uint8)
    images.setflags(write=False)  # the builder must not write into its input
    labels = np.arange(N) * 7  # label i * 7 identifies source image i
    return images, labels


def build(data, **kwargs) -> CorruptedStream:
    kwargs.setdefault("corruptions", NAMES)
    kwargs.setdefault("severities", (1, 3))
    return build_stream(*data, **kwargs)


def test_segments_order_and_content(data) -> None:
    stream = build(data)
    assert [(s.corruption, s.severity) for s in stream.segments] == \
        [(c, s) for c in NAMES for s in (1, 3)]
    assert len(stream) == len(NAMES) * 2 * N
    for seg in stream.segments:
        assert isinstance(seg, Segment) and len(seg) == N
        assert seg.images.dtype == np.uint8 and seg.images.shape == (N, 16, 16, 3)
        assert seg.labels.dtype == np.int64
        assert sorted(seg.labels.tolist()) == sorted(data[1].tolist())  # a permutation
        assert not seg.images.flags.writeable and not seg.labels.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        stream.segments[0].severity = 2  # type: ignore[misc]


def test_images_stay_paired_with_labels(data) -> None:
    # contrast is deterministic, so each shuffled sample must equal its source image corrupted.
    images, labels = data
    seg = build(data, corruptions=("contrast",), severities=(2,), seed=4).segments[0]
    assert not np.array_equal(seg.labels, labels)  # actually shuffled
    expected = corrupt(images, "contrast", 2, seed=0)
    np.testing.assert_array_equal(seg.images, expected[seg.labels // 7])


def test_no_shuffle_keeps_order(data) -> None:
    seg = build(data, corruptions=("fog",), severities=(5,), shuffle=False).segments[0]
    np.testing.assert_array_equal(seg.labels, data[1])


def test_deterministic_and_seeded(data) -> None:
    a, b = build(data, seed=3), build(data, seed=3)
    c = build(data, seed=4)
    for sa, sb, sc in zip(a.segments, b.segments, c.segments):
        assert sa.images.tobytes() == sb.images.tobytes()
        np.testing.assert_array_equal(sa.labels, sb.labels)
    assert any(not np.array_equal(sa.images, sc.images) for sa, sc in zip(a.segments, c.segments))


def test_chunking_is_deterministic(data, monkeypatch) -> None:
    monkeypatch.setattr(streams, "CHUNK_PIXELS", 3 * 16 * 16)  # 3 images per chunk
    assert streams.chunk_size_for(16, 16) == 3
    a = build(data, corruptions=("gaussian_noise", "contrast"), severities=(4,))
    b = build(data, corruptions=("gaussian_noise", "contrast"), severities=(4,))
    for sa, sb in zip(a.segments, b.segments):
        assert sa.images.tobytes() == sb.images.tobytes()
    images = data[0]
    contrast = a.segments[1]
    np.testing.assert_array_equal(contrast.images,
                                  corrupt(images, "contrast", 4, seed=0)[contrast.labels // 7])


@pytest.mark.parametrize("batch_size", [1, 3, 4, 10, 25])
def test_batches_never_cross_segments(data, batch_size: int) -> None:
    stream = build(data)
    batches = list(stream.batches(batch_size))
    per_segment = math.ceil(N / batch_size)
    assert len(batches) == per_segment * len(stream.segments)
    assert [b.index for b in batches] == list(range(len(batches)))
    assert sum(len(b.labels) for b in batches) == len(stream)
    for k, seg in enumerate(stream.segments):
        mine = batches[k * per_segment:(k + 1) * per_segment]
        assert all(isinstance(b, StreamBatch) for b in mine)
        assert {(b.corruption, b.severity) for b in mine} == {(seg.corruption, seg.severity)}
        np.testing.assert_array_equal(np.concatenate([b.images for b in mine]), seg.images)
        np.testing.assert_array_equal(np.concatenate([b.labels for b in mine]), seg.labels)
        assert all(len(b.labels) <= batch_size for b in mine)


def test_reset_flags_per_protocol(data) -> None:
    reset = list(build(data, protocol="reset").batches(4))
    firsts = {i for i, b in enumerate(reset) if i == 0
              or (b.corruption, b.severity) != (reset[i - 1].corruption, reset[i - 1].severity)}
    assert {i for i, b in enumerate(reset) if b.reset} == firsts
    assert len(firsts) == len(NAMES) * 2
    continual = list(build(data, protocol="continual").batches(4))
    assert [b.reset for b in continual] == [True] + [False] * (len(continual) - 1)


def test_passes_recorrupt_and_limit(data) -> None:
    images, labels = data
    stream = build(data, corruptions=("gaussian_noise",), severities=(2,), passes=3,
                   shuffle=False)
    seg = stream.segments[0]
    assert len(seg) == 3 * N and len(stream) == 3 * N
    np.testing.assert_array_equal(seg.labels, np.tile(labels, 3))
    assert not np.array_equal(seg.images[:N], seg.images[N:2 * N])  # own seed per pass
    shuffled = build(data, corruptions=("contrast",), severities=(2,), passes=2).segments[0]
    assert not np.array_equal(shuffled.labels[:N], shuffled.labels[N:])  # reshuffled per pass
    limited = build(data, passes=2, limit=13)
    assert [len(s) for s in limited.segments] == [13] * len(limited.segments)
    assert len(limited) == 13 * len(limited.segments)
    assert len(build(data, corruptions=("fog",), limit=100).segments[0]) == N
    few = build(data, corruptions=("fog",), severities=3, limit=4).segments[0]
    assert len(few) == 4 and len(set(few.labels.tolist())) == 4


def test_distinct_samples_per_corruption(data) -> None:
    """Long streams: each segment its own distinct images from the pool, seeded, reproducible."""
    images, labels = data
    stream = build(data, corruptions=("contrast", "fog", "gaussian_noise"), severities=(5,), samples=6)
    picks = [sorted(seg.labels.tolist()) for seg in stream.segments]
    for pick in picks:
        assert len(pick) == 6 == len(set(pick))  # distinct within the segment
        assert set(pick) <= set(labels.tolist())
    assert len({tuple(p) for p in picks}) > 1  # segments draw their own subsets
    again = build(data, corruptions=("contrast", "fog", "gaussian_noise"), severities=(5,), samples=6)
    for a, b in zip(stream.segments, again.segments):
        np.testing.assert_array_equal(a.images, b.images)
    # contrast is deterministic: each sample is its source image corrupted
    seg = stream.segments[0]
    np.testing.assert_array_equal(seg.images, corrupt(images, "contrast", 5, seed=0)[seg.labels // 7])
    # with passes, the same distinct subset repeats, re-corrupted; limit still caps
    two = build(data, corruptions=("gaussian_noise",), severities=(5,), samples=4, passes=2, limit=7).segments[0]
    assert len(two) == 7 and set(two.labels[4:].tolist()) <= set(two.labels[:4].tolist())
    with pytest.raises(ValueError, match="pool holds only 10"):
        build(data, samples=11)


def test_samples(data) -> None:
    stream = build(data, corruptions=("contrast", "fog"), severities=(5,))
    samples = list(stream.samples())
    assert len(samples) == len(stream)
    image, label, corruption, severity = samples[N]
    assert image.shape == (16, 16, 3) and isinstance(label, int)
    assert (corruption, severity) == ("fog", 5)
    np.testing.assert_array_equal(image, stream.segments[1].images[0])


def test_default_is_all_15_at_severity_5(data) -> None:
    stream = build_stream(*data, limit=2)
    assert len(stream.segments) == 15
    assert {s.severity for s in stream.segments} == {5}


@pytest.mark.parametrize("kwargs, match", [
    ({"protocol": "episodic"}, "protocol"),
    ({"corruptions": ()}, "corruptions"),
    ({"corruptions": ("fog", "rain")}, "unknown corruption"),
    ({"severities": ()}, "severities"),
    ({"severities": (0,)}, "severity"),
    ({"passes": 0}, "passes"),
    ({"limit": 0}, "limit"),
    ({"samples": 0}, "samples"),
    ({"seed": -1}, "seed"),
    ({"constants": "tiny"}, "constants"),
])
def test_bad_arguments(data, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(data, **kwargs)


def test_bad_data(data) -> None:
    images, labels = data
    with pytest.raises(ValueError, match="labels"):
        build_stream(images, labels[:-1])
    with pytest.raises(ValueError, match="uint8"):
        build_stream(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="uint8"):
        build_stream(images[0], labels)
    with pytest.raises(ValueError, match="integers"):
        build_stream(images, labels.astype(float))
    with pytest.raises(ValueError, match="empty"):
        build_stream(images[:0], labels[:0])
    with pytest.raises(ValueError, match="batch_size"):
        next(build(data).batches(0))
    with pytest.raises(ValueError, match="protocol"):
        CorruptedStream([], "sometimes")
