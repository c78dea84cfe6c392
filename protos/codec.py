"""The one numpy <-> protobuf codec (numpy + protobuf only: edges and cloud both use it).

Arrays travel as little-endian C-order bytes with their shape and dtype; decoding validates that
the byte count matches, so a malformed message is refused with a ``ValueError`` (the server maps
it to ``INVALID_ARGUMENT``) instead of being reinterpreted.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from protos.contract import check_images
from protos.fedshift.v1 import edge_pb2 as pb

# Messages above the gRPC default of 4 MiB are needed for batches of larger images; 64 MiB
# bounds one upload at e.g. 256 images of 224x224x3 uint8 (38.5 MB) with room to spare.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# trailing metadata of a RESOURCE_EXHAUSTED answer: how long the caller should wait before retrying
RETRY_AFTER_KEY = "retry-after-ms"
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

_TO_PB = {
    np.dtype("<f4"): pb.FLOAT32,
    np.dtype("uint8"): pb.UINT8,
    np.dtype("<f2"): pb.FLOAT16,
    np.dtype("<i8"): pb.INT64,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}


def encode_array(array: np.ndarray, name: str = "") -> pb.Tensor:
    """numpy array -> Tensor (float64 is narrowed to float32; other dtypes must be supported)."""
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    key = array.dtype.newbyteorder("<")
    if key not in _TO_PB:
        raise ValueError(f"cannot encode dtype {array.dtype} (supported: float32, float16, uint8, int64)")
    data = np.ascontiguousarray(array, dtype=key).tobytes()
    return pb.Tensor(name=name, shape=list(array.shape), dtype=_TO_PB[key], data=data)


def decode_array(tensor: pb.Tensor) -> np.ndarray:
    """Tensor -> numpy array (a writable copy); raises ValueError on any inconsistency."""
    if tensor.dtype not in _FROM_PB:
        raise ValueError(f"tensor {tensor.name!r}: unsupported dtype {tensor.dtype}")
    dtype = _FROM_PB[tensor.dtype]
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"tensor {tensor.name!r}: negative dimension in shape {shape}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(f"tensor {tensor.name!r}: {len(tensor.data)} bytes for shape {shape} {dtype} "
                         f"(expected {expected})")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).copy()


def encode_state(state: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    """A named state (e.g. normalization tensors) -> list of Tensors, float32."""
    return [encode_array(np.asarray(v, dtype=np.float32), name) for name, v in state.items()]


def decode_state(tensors: Iterable[pb.Tensor]) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_state`; refuses unnamed or repeated names."""
    out: dict[str, np.ndarray] = {}
    for t in tensors:
        if not t.name:
            raise ValueError("state tensor without a name")
        if t.name in out:
            raise ValueError(f"state tensor {t.name!r} appears twice")
        out[t.name] = decode_array(t)
    return out


def decode_images(tensor: pb.Tensor) -> np.ndarray:
    """An uploaded image batch: :func:`protos.contract.check_images`'s rule."""
    return check_images(decode_array(tensor))
