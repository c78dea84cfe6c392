"""What the cloud accepts from an edge, as pure functions: each returns the decoded values or
raises :class:`ValueError` saying what is wrong, and the RPC handler turns that into
INVALID_ARGUMENT (or OUT_OF_RANGE) for the caller. Nothing here touches the service's state.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

import numpy as np

from protos.codec import decode_images
from protos.fedshift.v1 import edge_pb2 as pb

MAX_SEQUENCE = 2**63  # sequence numbers an edge may use: the next one must still fit the wire's uint64
MAX_METRICS = 64  # metric names one edge may report (bounded memory and TensorBoard tags)
METRIC_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,64}")


def upload_arrays(request: pb.UploadRequest, *, image_shape: tuple[int, int, int], max_samples: int,
                  num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The upload's uint8 images (N, H, W, C) and labels ((N,) or (0,)), checked against the
    cloud's model and limits."""
    images = decode_images(request.images)
    n = len(images)
    if n == 0:
        raise ValueError("empty batch (no images)")
    if n > max_samples:
        raise ValueError(f"{n} images in one upload, the cloud takes at most {max_samples}")
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"images are {images.shape[1:]} (H, W, C), the cloud's model takes {tuple(image_shape)}")
    if len(request.entropies) not in (0, n):
        raise ValueError(f"{len(request.entropies)} entropies for {n} images")
    if not np.all(np.isfinite(np.asarray(request.entropies, dtype=np.float64))):
        raise ValueError("entropies must be finite")
    labels = np.asarray(request.labels, dtype=np.int64)
    if len(labels) not in (0, n):
        raise ValueError(f"{len(labels)} labels for {n} images (send N or none)")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return images, labels


def metric_values(values: Mapping[str, float], known: Iterable[str]) -> dict[str, float]:
    """Reported metrics, checked: finite values, names a TensorBoard tag can carry, and at most
    :data:`MAX_METRICS` names per edge together with those it reported before (``known``)."""
    values = dict(values)
    if bad := sorted(k for k, v in values.items() if not math.isfinite(v)):
        raise ValueError(f"metrics must be finite numbers: {', '.join(bad)}")
    if bad := sorted(k for k in values if not METRIC_NAME.fullmatch(k))[:4]:
        raise ValueError(f"metric names must match {METRIC_NAME.pattern}: {', '.join(repr(k[:80]) for k in bad)}")
    if len(set(known) | set(values)) > MAX_METRICS:  # each name is kept and becomes a TensorBoard tag
        raise ValueError(f"an edge reports at most {MAX_METRICS} metric names")
    return values
