"""Edge test streams: a labelled image set replayed as a sequence of corrupted segments.

Two protocols, as in the test-time-adaptation literature:

* ``"reset"`` -- each (corruption, severity) segment is an independent test; the consumer resets
  its model at the first batch of every segment (``StreamBatch.reset``).
* ``"continual"`` -- CoTTA-style continual adaptation: the segments follow each other without
  resets; only the very first batch of the stream has ``reset=True``.

Segments are ordered corruption-major: ``for corruption in corruptions: for severity in
severities`` (so ``severities=(1, 2, 3, 4, 5, 4, 3, 2, 1)`` gives CoTTA's gradual setting).  Each
segment is corrupted once, eagerly, in fixed-size chunks (bounded memory, whole-chunk
vectorisation); every chunk and every permutation has its own generator from
:func:`core.corruptions.corruption_seed`, so a stream is a pure function of its arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from core.corruptions import (CORRUPTIONS, check_corruption, corrupt, corruption_seed,
                              resolve_constants)
from protos.contract import PROTOCOLS  # the stream file format's protocols, shared with the edge

logger = logging.getLogger(__name__)

CHUNK_PIXELS = 1 << 22  # pixels (H * W) per corruption chunk: ~50 MB of float32 RGB
MAX_CHUNK = 1024


@dataclass(frozen=True, eq=False)
class StreamBatch:
    """One batch handed to an edge consumer; never spans two segments."""

    images: np.ndarray  # uint8 (B, H, W, 3), read-only view
    labels: np.ndarray  # int64 (B,)
    corruption: str
    severity: int
    reset: bool  # consumer should reset its model before this batch
    index: int  # position of the batch in the whole stream


@dataclass(frozen=True, eq=False)
class Segment:
    """All samples of one (corruption, severity) in stream order (passes concatenated)."""

    corruption: str
    severity: int
    images: np.ndarray  # uint8 (M, H, W, 3), read-only
    labels: np.ndarray  # int64 (M,), read-only

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class CorruptedStream:
    """An ordered list of corrupted segments plus the protocol that says when to reset."""

    def __init__(self, segments: Sequence[Segment], protocol: str) -> None:
        _check_protocol(protocol)
        self._segments = tuple(segments)
        self.protocol = protocol

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    def __len__(self) -> int:
        return sum(len(s) for s in self._segments)

    def __repr__(self) -> str:
        return (f"CorruptedStream(protocol={self.protocol!r}, segments={len(self._segments)}, "
                f"samples={len(self)})")

    def batches(self, batch_size: int) -> Iterator[StreamBatch]:
        """Consecutive batches; the last batch of a segment may be short (no crossing)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        index = 0
        for seg_no, seg in enumerate(self._segments):
            for start in range(0, len(seg), int(batch_size)):
                first_of_segment = start == 0
                reset = index == 0 or (self.protocol == "reset" and first_of_segment)
                stop = start + int(batch_size)
                yield StreamBatch(seg.images[start:stop], seg.labels[start:stop],
                                  seg.corruption, seg.severity, reset, index)
                index += 1

    def samples(self) -> Iterator[tuple[np.ndarray, int, str, int]]:
        """Every sample in stream order as ``(image, label, corruption, severity)``."""
        for seg in self._segments:
            for image, label in zip(seg.images, seg.labels):
                yield image, int(label), seg.corruption, seg.severity


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_data(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", None)
        raise ValueError(f"images must be a uint8 array (N, H, W, 3), got {dtype} {shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be 1-D with one label per image: {labels.shape[0:1]} "
                         f"labels for {images.shape[0]} images")
    if images.shape[0] == 0:
        raise ValueError("images must not be empty")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    return labels.astype(np.int64)


def _as_tuple(values: object, single: type, what: str) -> tuple:
    out = (values,) if isinstance(values, single) else tuple(values)  # type: ignore[arg-type]
    if not out:
        raise ValueError(f"{what} must not be empty")
    return out


def chunk_size_for(height: int, width: int) -> int:
    """Images per corruption chunk for a given image size (fixed, so streams are reproducible)."""
    return max(1, min(MAX_CHUNK, CHUNK_PIXELS // (height * width)))


def _corrupt_pass(images: np.ndarray, corruption: str, severity: int, seed: int,
                  keys: tuple, constants: str) -> np.ndarray:
    """Corrupt ``images`` chunk by chunk, each chunk with its own keyed generator."""
    step = chunk_size_for(*images.shape[1:3])
    out = np.empty_like(images)
    for chunk_no, start in enumerate(range(0, images.shape[0], step)):
        rng = corruption_seed(seed, *keys, "chunk", chunk_no)
        out[start:start + step] = corrupt(images[start:start + step], corruption, severity,
                                          seed=rng, constants=constants)
    return out


def _build_segment(images: np.ndarray, labels: np.ndarray, corruption: str, severity: int, *,
                   seg_no: int, passes: int, shuffle: bool, seed: int, limit: int | None,
                   constants: str, samples: int | None = None) -> Segment:
    if samples is not None:  # this segment's own distinct images, drawn from the pool
        pick = np.sort(corruption_seed(seed, "segment", seg_no, corruption, severity, "samples")
                       .choice(images.shape[0], size=samples, replace=False))
        images, labels = images[pick], labels[pick]
    n = images.shape[0]
    total = n * passes if limit is None else min(limit, n * passes)
    parts_x, parts_y = [], []
    produced = 0
    for pass_no in range(passes):
        take = min(n, total - produced)
        if take <= 0:
            break
        keys = ("segment", seg_no, corruption, severity, "pass", pass_no)
        order = (corruption_seed(seed, *keys, "order").permutation(n) if shuffle
                 else np.arange(n))[:take]
        parts_x.append(_corrupt_pass(images[order], corruption, severity, seed, keys, constants))
        parts_y.append(labels[order])
        produced += take
    seg_x, seg_y = np.concatenate(parts_x), np.concatenate(parts_y)
    seg_x.setflags(write=False)
    seg_y.setflags(write=False)
    logger.info("segment %d: %s s%d, %d samples", seg_no, corruption, severity, len(seg_y))
    return Segment(corruption, int(severity), seg_x, seg_y)


def build_stream(images: np.ndarray, labels: np.ndarray, *,
                 corruptions: Sequence[str] | str = CORRUPTIONS,
                 severities: Sequence[int] | int = (5,), protocol: str = "reset",
                 passes: int = 1, shuffle: bool = True, seed: int = 0, limit: int | None = None,
                 samples: int | None = None, constants: str = "auto") -> CorruptedStream:
    """Build the edge test stream: one corrupted segment per (corruption, severity).

    ``samples`` (the long-stream knob) gives each segment that many *distinct* images, drawn
    without replacement from the pool by a generator keyed by the segment (so segments differ in
    which images they show, as ImageNet-C shows each image under every corruption only when the
    pool is used whole); ``None`` uses the whole pool. ``passes`` repeats each segment's images
    (each pass re-shuffled and re-corrupted with its own seed); ``limit`` caps the samples per
    segment (passes included); ``constants`` is passed to :func:`core.corruptions.corrupt`
    ("auto": CIFAR-10-C constants for images <= 64 px).
    """
    _check_protocol(protocol)
    labels = _check_data(images, labels)
    corruptions = _as_tuple(corruptions, str, "corruptions")
    severities = _as_tuple(severities, (int, np.integer), "severities")
    for name in corruptions:
        for sev in severities:
            check_corruption(name, sev)
    resolve_constants(constants, *images.shape[1:3])  # validates the name
    passes = _positive_int(passes, "passes")
    if limit is not None:
        limit = _positive_int(limit, "limit")
    if samples is not None:
        samples = _positive_int(samples, "samples")
        if samples > images.shape[0]:
            raise ValueError(f"samples = {samples} distinct images per corruption, but the pool holds only "
                             f"{images.shape[0]}: use a larger test split or passes > 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    pairs = [(c, int(s)) for c in corruptions for s in severities]
    segments = [
        _build_segment(images, labels, c, s, seg_no=i, passes=passes, shuffle=bool(shuffle),
                       seed=int(seed), limit=limit, constants=constants, samples=samples)
        for i, (c, s) in enumerate(pairs)
    ]
    return CorruptedStream(segments, protocol)
