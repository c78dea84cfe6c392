"""What the cloud (``core``) and a torch-free edge must agree on about the files they exchange.

Two files cross the edge/core wall besides gRPC messages, and both are defined here once
(with the sidecar of a model whose norm tensors are inputs, :func:`norm_sidecar_path`):

- the **edge model** (ONNX): its ``metadata_props`` carry everything an edge needs to run it —
  :class:`ModelMetadata`, written by ``core.export`` through :meth:`ModelMetadata.to_metadata`
  and read by ``edge.runtime`` through :meth:`ModelMetadata.from_metadata`; the keys are
  :data:`KEYS` (prefix ``fedshift.``) and the preprocessing is :class:`Preprocess`, whose numpy
  math is what the edge runs and what ``core.training.to_tensor`` mirrors in torch;
- the **stream file** (.npz) an edge replays: :func:`save_stream_npz` / :func:`load_stream_npz`.

And the rules both ends apply: the image-batch rule (:func:`check_images`), EATA's threshold
(:func:`entropy_margin`, :data:`E0_FACTOR`) and the auth-token variable (:data:`TOKEN_ENV`).

numpy + stdlib only (``protos`` may use grpc and protobuf too; this module does not need them),
so it loads on an edge-only install.

The stream .npz format (plain arrays only, so it loads with ``allow_pickle=False``):

=================  ==================  ====================================================
key                dtype / shape       meaning
=================  ==================  ====================================================
``format``         str, ()             ``"fedshift.stream/1"``
``protocol``       str, ()             ``"reset"`` (reset at each segment start) or
                                       ``"continual"`` (reset only at the start)
``images``         uint8 (N, H, W, C)  all samples, segments back to back, C in {1, 3}
``labels``         int64 (N,)          optional (absent = unlabelled stream)
``reference``      int64 (N,)          optional: a reference model's predictions (the
                                       ``oracle`` selection of benchmarks reads them)
``corruptions``    str (S,)            corruption name of each segment
``severities``     int64 (S,)          severity of each segment
``offsets``        int64 (S + 1,)      segment ``i`` is ``images[offsets[i]:offsets[i+1]]``
=================  ==================  ====================================================
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

# ------------------------------------------------------------------------------ model metadata

META_PREFIX = "fedshift."
FORMAT_VERSION = 1  # of the model metadata; a reader refuses files newer than it knows
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
NORM_MODES = ("initializers", "inputs")


@dataclass(frozen=True)
class MetadataKeys:
    """The ONNX ``metadata_props`` keys of an edge model (one place, so both sides spell them alike)."""

    format: str = META_PREFIX + "format"
    model: str = META_PREFIX + "model"
    version: str = META_PREFIX + "version"
    input_name: str = META_PREFIX + "input_name"
    output_name: str = META_PREFIX + "output_name"
    input_shape: str = META_PREFIX + "input_shape"
    preprocess: str = META_PREFIX + "preprocess"
    class_names: str = META_PREFIX + "class_names"
    norm_mode: str = META_PREFIX + "norm_mode"
    batch_stats: str = META_PREFIX + "batch_stats"
    norm_names: str = META_PREFIX + "norm_names"
    norm_shapes: str = META_PREFIX + "norm_shapes"
    norm_offsets: str = META_PREFIX + "norm_offsets"


KEYS = MetadataKeys()


@dataclass(frozen=True)
class Preprocess:
    """How uint8 NHWC images become the model's float32 NCHW input: ``(x / scale - mean) / std``.

    numpy only, so the edge runs exactly this; training mirrors the same fields in torch.
    ``mean`` / ``std`` come first so ``Preprocess(mean, std)`` keeps meaning what it always did.
    """

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    scale: float = 255.0

    def __post_init__(self) -> None:
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        scale = float(self.scale)
        if not mean or len(mean) != len(std):
            raise ValueError(f"preprocess mean and std need one value per channel, got {mean} and {std}")
        if not all(math.isfinite(v) for v in mean + std + (scale,)):
            raise ValueError(f"preprocess values must be finite, got mean {mean}, std {std}, scale {scale}")
        if min(std) <= 0 or scale <= 0:
            raise ValueError(f"preprocess std and scale must be > 0, got std {std}, scale {scale}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "scale", scale)

    def to_json(self) -> str:
        """The text stored under ``fedshift.preprocess`` (the format every export has written)."""
        return json.dumps({"scale": self.scale, "mean": list(self.mean), "std": list(self.std), "layout": "NCHW"})

    @classmethod
    def from_json(cls, text: str) -> "Preprocess":
        try:
            d = json.loads(text)
            if d.get("layout", "NCHW") != "NCHW":
                raise ValueError(f"layout {d['layout']!r} is not supported (NCHW only)")
            return cls(tuple(d["mean"]), tuple(d["std"]), d.get("scale", 255.0))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ValueError(f"malformed preprocess {text!r}: {exc}") from exc

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(N, H, W, C)`` -> contiguous float32 ``(N, C, H, W)``."""
        images = np.asarray(images)
        if images.ndim != 4 or (len(self.mean) != 1 and images.shape[-1] != len(self.mean)):
            raise ValueError(f"images must be (N, H, W, {len(self.mean)}), got {images.shape}")
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / self.scale
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


@dataclass(frozen=True)
class ModelMetadata:
    """Everything an exported edge model's metadata carries, so an edge needs nothing but the file.

    ``norm_offsets`` (byte offset of each norm tensor's raw data in the file) is present exactly in
    ``"initializers"`` mode; in ``"inputs"`` mode the values travel in a ``.norm.npz`` sidecar.
    """

    input_shape: tuple[int, int, int]  # (C, H, W); the batch axis is always dynamic
    class_names: tuple[str, ...]
    norm_names: tuple[str, ...]
    norm_shapes: tuple[tuple[int, ...], ...]
    norm_mode: str = "initializers"
    norm_offsets: tuple[int, ...] | None = None
    preprocess: Preprocess = Preprocess()
    model_name: str = ""
    version: int = 0
    batch_stats: bool = False  # BatchNorm normalizes with the predicted batch's own statistics
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        put = object.__setattr__  # normalise sequences to tuples so equality means "same file metadata"
        put(self, "input_shape", tuple(int(v) for v in self.input_shape))
        put(self, "class_names", tuple(str(v) for v in self.class_names))
        put(self, "norm_names", tuple(str(v) for v in self.norm_names))
        put(self, "norm_shapes", tuple(tuple(int(d) for d in s) for s in self.norm_shapes))
        if self.norm_offsets is not None:
            put(self, "norm_offsets", tuple(int(v) for v in self.norm_offsets))
        put(self, "version", int(self.version))
        put(self, "format", int(self.format))
        put(self, "batch_stats", bool(self.batch_stats))
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {self.input_shape}")
        if not self.class_names:
            raise ValueError("a model needs at least one class name")
        if len(self.norm_shapes) != len(self.norm_names):
            raise ValueError(f"{len(self.norm_names)} norm names but {len(self.norm_shapes)} shapes")
        if self.norm_mode not in NORM_MODES:
            raise ValueError(f"unknown norm_mode {self.norm_mode!r} (one of {NORM_MODES})")
        if self.norm_mode == "initializers":
            if self.norm_offsets is None or len(self.norm_offsets) != len(self.norm_names):
                raise ValueError("initializers mode needs one byte offset per norm tensor")
        elif self.norm_offsets is not None:
            raise ValueError("inputs mode carries no norm offsets (the values live in a sidecar)")
        if self.version < 0:
            raise ValueError(f"version must be >= 0, got {self.version}")
        if not 1 <= self.format <= FORMAT_VERSION:
            raise ValueError(f"model metadata format {self.format} is not supported "
                             f"(this reader knows up to {FORMAT_VERSION})")

    def norm_tensor(self, model_bytes: bytes | bytearray, name: str) -> np.ndarray:
        """One normalization tensor's values, read at its byte offset in the model file
        (``initializers`` mode); the edge runtime and the cloud read a file's state the same way."""
        if self.norm_offsets is None:
            raise ValueError("inputs mode: the norm values live in the .norm.npz sidecar, not the model file")
        i = self.norm_names.index(name)
        shape, off = self.norm_shapes[i], self.norm_offsets[i]
        count = int(np.prod(shape))
        if off < 0 or off + 4 * count > len(model_bytes):
            raise ValueError(f"the offset of {name} lies outside the file")
        return np.frombuffer(bytes(model_bytes[off:off + 4 * count]), dtype="<f4").reshape(shape).copy()

    def norm_state(self, model_bytes: bytes | bytearray) -> dict[str, np.ndarray]:
        """Every normalization tensor of the file (``initializers`` mode), by name."""
        return {n: self.norm_tensor(model_bytes, n) for n in self.norm_names}

    def to_metadata(self) -> dict[str, str]:
        """The exact ``metadata_props`` key/value strings of the ONNX file."""
        meta = {
            KEYS.format: str(self.format),
            KEYS.model: self.model_name,
            KEYS.version: str(self.version),
            KEYS.input_name: self.input_name,
            KEYS.output_name: self.output_name,
            KEYS.input_shape: json.dumps([None, *self.input_shape]),
            KEYS.preprocess: self.preprocess.to_json(),
            KEYS.class_names: json.dumps(list(self.class_names)),
            KEYS.norm_mode: self.norm_mode,
            KEYS.batch_stats: "1" if self.batch_stats else "0",
            KEYS.norm_names: json.dumps(list(self.norm_names)),
            KEYS.norm_shapes: json.dumps([list(s) for s in self.norm_shapes]),
        }
        if self.norm_offsets is not None:
            meta[KEYS.norm_offsets] = json.dumps(list(self.norm_offsets))
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> "ModelMetadata":
        """Parse a model's ``metadata_props``; ``ValueError`` naming the key when one is missing or bad.

        Keys other than ``fedshift.*`` are ignored. ``model``, ``batch_stats``, ``format`` and
        ``output_name`` are optional, as edges have always treated them.
        """
        def need(key: str) -> str:
            if key not in meta:
                raise ValueError(f"metadata key {key!r} missing")
            return meta[key]

        def listed(key: str) -> list:
            try:
                value = json.loads(need(key))
            except json.JSONDecodeError as exc:
                raise ValueError(f"metadata key {key!r}: not JSON ({exc})") from exc
            if not isinstance(value, list):
                raise ValueError(f"metadata key {key!r}: expected a JSON list, got {value!r}")
            return value

        def integer(key: str, default: str | None = None) -> int:
            text = meta.get(key, default) if default is not None else need(key)
            try:
                return int(text)
            except ValueError as exc:
                raise ValueError(f"metadata key {key!r}: not an integer ({text!r})") from exc

        norm_mode = need(KEYS.norm_mode)
        input_shape = listed(KEYS.input_shape)
        if len(input_shape) != 4:
            raise ValueError(f"metadata key {KEYS.input_shape!r}: expected [null, C, H, W], got {input_shape}")
        try:
            return cls(
                input_shape=tuple(input_shape[1:]),
                class_names=tuple(listed(KEYS.class_names)),
                norm_names=tuple(listed(KEYS.norm_names)),
                norm_shapes=tuple(listed(KEYS.norm_shapes)),
                norm_mode=norm_mode,
                norm_offsets=tuple(listed(KEYS.norm_offsets)) if norm_mode == "initializers" else None,
                preprocess=Preprocess.from_json(need(KEYS.preprocess)),
                model_name=meta.get(KEYS.model, ""),
                version=integer(KEYS.version),
                batch_stats=meta.get(KEYS.batch_stats, "0") == "1",
                input_name=need(KEYS.input_name),
                output_name=meta.get(KEYS.output_name, OUTPUT_NAME),
                format=integer(KEYS.format, str(FORMAT_VERSION)),
            )
        except TypeError as exc:  # e.g. a number where a list of shapes was expected
            raise ValueError(f"malformed fedshift model metadata: {exc}") from exc


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file: how an edge tells the cloud which model file it runs."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ stream files

IMAGE_CHANNELS = (1, 3)  # grey or RGB, channels last
TOKEN_ENV = "FEDSHIFT_TOKEN"  # the environment variable an edge's / the cloud's auth token falls back to
E0_FACTOR = 0.4  # EATA's reliability threshold E0 = factor · ln C, on the edge's filter and the cloud's weights


def token_or_env(token: str) -> str:
    """An auth token as configured, else ``$FEDSHIFT_TOKEN`` (:data:`TOKEN_ENV`), else none: the one
    fallback rule of the cloud and the edges (a token in the environment stays out of config files)."""
    return token or os.environ.get(TOKEN_ENV, "")


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """The one rule for an image batch anywhere between edge and cloud (uploads, stream files,
    array sources): uint8 (N, H, W, C) with C in :data:`IMAGE_CHANNELS`; ValueError otherwise."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in IMAGE_CHANNELS:
        raise ValueError(f"{what} must be uint8 (N, H, W, 1|3), got {images.dtype} {images.shape}")
    return images


def entropy_margin(e0_factor: float, num_classes: int) -> float:
    """``E0 = e0_factor · ln C``: EATA's static reliability threshold (edge filter, cloud weights)."""
    return e0_factor * math.log(num_classes)


def norm_sidecar_path(model_path: str | os.PathLike) -> Path:
    """Where a model exported with its norm tensors as graph *inputs* keeps their values:
    ``<name>.norm.npz`` beside it (plain arrays by tensor name)."""
    return Path(model_path).with_suffix(".norm.npz")


def save_norm_sidecar(model_path: str | os.PathLike, state: Mapping[str, np.ndarray]) -> Path:
    path = norm_sidecar_path(model_path)
    np.savez(path, **{name: np.asarray(value, np.float32) for name, value in state.items()})
    return path


def load_norm_sidecar(model_path: str | os.PathLike, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The values of ``names`` from the model's sidecar; ValueError when it or a tensor is missing."""
    path = norm_sidecar_path(model_path)
    if not path.is_file():
        raise ValueError(f"{model_path} keeps its norm tensors as inputs; their values {path} are missing")
    with np.load(path, allow_pickle=False) as data:
        if missing := [n for n in names if n not in data.files][:4]:
            raise ValueError(f"{path} lacks norm tensors {missing}")
        return {n: np.ascontiguousarray(data[n], dtype=np.float32) for n in names}


STREAM_FORMAT = "fedshift.stream/1"
PROTOCOLS = ("reset", "continual")
_STREAM_KEYS = frozenset({"format", "protocol", "images", "corruptions", "severities", "offsets"})


@dataclass(frozen=True)
class StreamSegment:
    """One shift of a stream: a corruption at a severity, its images and (optional) labels."""

    corruption: str
    severity: int
    images: np.ndarray
    labels: np.ndarray | None
    reference: np.ndarray | None = None  # a reference model's predictions (oracle benchmarks)


@dataclass(frozen=True)
class StreamFile:
    """The contents of a stream .npz file."""

    protocol: str
    segments: tuple[StreamSegment, ...]

    @property
    def num_samples(self) -> int:
        return sum(len(s.images) for s in self.segments)


def _int_labels(values: object, n: int, corruption: str, what: str) -> np.ndarray | None:
    if values is None:
        return None
    values = np.asarray(values)
    if values.shape != (n,) or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"segment {corruption!r}: {what} must be integers of shape ({n},), "
                         f"got {values.dtype} {values.shape}")
    return values.astype(np.int64)


def _as_segment(item: object) -> StreamSegment:
    """Accept ``(corruption, severity, images, labels)`` tuples or objects with those attributes
    (and an optional ``reference``)."""
    reference = None
    if isinstance(item, (tuple, list)):
        if len(item) != 4:
            raise ValueError(f"a segment is (corruption, severity, images, labels), got {len(item)} items")
        corruption, severity, images, labels = item
    else:
        try:
            corruption, severity = item.corruption, item.severity  # type: ignore[attr-defined]
            images, labels = item.images, item.labels  # type: ignore[attr-defined]
        except AttributeError as exc:
            raise ValueError(f"not a stream segment: {type(item).__name__}") from exc
        reference = getattr(item, "reference", None)
    images = check_images(np.asarray(images), f"segment {corruption!r}: images")
    labels = _int_labels(labels, len(images), str(corruption), "labels")
    reference = _int_labels(reference, len(images), str(corruption), "reference labels")
    return StreamSegment(str(corruption), int(severity), images, labels, reference)


def save_stream_npz(path: str | os.PathLike, segments: Iterable[object] | object, protocol: str | None = None,
                    *, compress: bool = False) -> Path:
    """Write a stream file (keys in the module docstring).

    ``segments``: ``(corruption, severity, images, labels)`` tuples or segment objects, or a stream
    object with ``.segments`` (and ``.protocol``, used when ``protocol`` is None).
    """
    if protocol is None:
        protocol = getattr(segments, "protocol", "reset")
    segments = getattr(segments, "segments", segments)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    segs = [_as_segment(s) for s in segments]  # type: ignore[union-attr]
    if not segs:
        raise ValueError("a stream needs at least one segment")
    shapes = {s.images.shape[1:] for s in segs}
    if len(shapes) != 1:
        raise ValueError(f"all segments must share one image shape, got {sorted(shapes)}")
    labelled = {s.labels is not None for s in segs}
    if len(labelled) != 1:
        raise ValueError("either every segment has labels or none has")
    arrays: dict[str, np.ndarray] = {
        "format": np.array(STREAM_FORMAT),
        "protocol": np.array(protocol),
        "images": np.concatenate([s.images for s in segs]),
        "corruptions": np.array([s.corruption for s in segs], dtype=str),
        "severities": np.array([s.severity for s in segs], dtype=np.int64),
        "offsets": np.cumsum([0] + [len(s.images) for s in segs]).astype(np.int64),
    }
    if labelled == {True}:
        arrays["labels"] = np.concatenate([s.labels for s in segs])  # type: ignore[misc]
    referenced = {s.reference is not None for s in segs}
    if len(referenced) != 1:
        raise ValueError("either every segment has reference labels or none has")
    if referenced == {True}:
        arrays["reference"] = np.concatenate([s.reference for s in segs])  # type: ignore[misc]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: numpy would otherwise append ".npz"
        (np.savez_compressed if compress else np.savez)(f, **arrays)
    return path


def load_stream_npz(path: str | os.PathLike) -> StreamFile:
    """Read and validate a stream written by :func:`save_stream_npz`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stream file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    with data:
        missing = _STREAM_KEYS - set(data.files)
        if missing:
            raise ValueError(f"{path}: not a fedshift stream, keys missing: {', '.join(sorted(missing))}")
        if str(data["format"]) != STREAM_FORMAT:
            raise ValueError(f"{path}: stream format {str(data['format'])!r}, expected {STREAM_FORMAT!r}")
        protocol = str(data["protocol"])
        images = data["images"]
        labels = data["labels"] if "labels" in data.files else None
        reference = data["reference"] if "reference" in data.files else None
        corruptions, severities, offsets = data["corruptions"], data["severities"], data["offsets"]
    if protocol not in PROTOCOLS:
        raise ValueError(f"{path}: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    check_images(images, f"{path}: images")
    n = len(images)
    for what, values in (("labels", labels), ("reference", reference)):
        if values is not None and (values.shape != (n,) or not np.issubdtype(values.dtype, np.integer)):
            raise ValueError(f"{path}: {what} {values.dtype} {values.shape}, expected integers ({n},)")
    s = len(corruptions)
    if severities.shape != (s,) or offsets.shape != (s + 1,) or offsets[0] != 0 or offsets[-1] != n \
            or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{path}: inconsistent segment table ({s} corruptions, severities "
                         f"{severities.shape}, offsets {offsets.tolist()[:8]}... for {n} images)")
    def part(values: np.ndarray | None, i: int) -> np.ndarray | None:
        return None if values is None else values[offsets[i]:offsets[i + 1]].astype(np.int64)

    segs = tuple(
        StreamSegment(str(corruptions[i]), int(severities[i]), images[offsets[i]:offsets[i + 1]],
                      part(labels, i), part(reference, i))
        for i in range(s)
    )
    return StreamFile(protocol, segs)


__all__ = (
    "FORMAT_VERSION", "INPUT_NAME", "KEYS", "META_PREFIX", "MetadataKeys", "ModelMetadata", "NORM_MODES",
    "OUTPUT_NAME", "PROTOCOLS", "Preprocess", "STREAM_FORMAT", "StreamFile", "StreamSegment",
    "file_sha256", "load_stream_npz", "save_stream_npz",
)
