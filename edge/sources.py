"""Input sources of an edge node, and the ``--source`` spec strings that name them.

Every source is an iterable of :class:`EdgeBatch` (uint8 NHWC images, optional int64 labels, the
shift the batch belongs to and a ``reset`` flag that starts a new episode of the reset-per-shift
protocol). A batch never spans two segments, so each carries exactly one corruption.

The spec strings (``--source``) and what each reads are :data:`SOURCE_HELP`, which ``fedshift
edge --help`` prints; the live ones have their own modules (:mod:`edge.watch`, :mod:`edge.camera`).

Array sources (npz, npy, stdin) must already have the model's input size; image sources (folder,
watch, camera) are converted and resized to it by one rule (:mod:`edge.images`). The float
preprocessing always comes from the ONNX metadata, applied by the runtime.

The .npz stream format is part of the edge/cloud contract and lives in :mod:`protos.contract`
(``save_stream_npz`` / ``load_stream_npz``, re-exported here); the launcher builds the built-in
corrupted digits stream with ``core.streams`` and saves it with it. This module never imports
``core`` (edges are torch-free).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol, Sequence

import numpy as np

from edge.images import IMAGE_SUFFIXES, InputSize, read_image, require_pillow
from protos.contract import (PROTOCOLS, STREAM_FORMAT, StreamFile, StreamSegment,  # noqa: F401 - re-exported
                             check_images, load_stream_npz, save_stream_npz)

__all__ = ["EdgeBatch", "FolderSource", "IMAGE_SUFFIXES", "NpySource", "NpzSource", "SOURCE_HELP", "SOURCE_SPECS",
           "Source", "StdinSource", "check_batch_size", "load_stream_npz", "open_source", "parse_frame_shape",
           "save_stream_npz"]

# what --source accepts (the config's help and every "bad spec" error say it) and what each reads
SOURCE_SPECS = "npz:PATH | npy:PATH | folder:DIR | watch:DIR | camera:INDEX|/dev/videoN | stdin:HxWxC"
SOURCE_HELP = """sources (--source):
  npz:PATH       a stream file (fedshift.stream/1): segments, labels, the reset protocol
  npy:PATH       a uint8 (N, H, W, C) array file (np.save), unlabelled
  folder:DIR     the images under DIR, sorted (labelled when laid out as DIR/<class>/...)
  watch:DIR      image files as they arrive in DIR (those there at start too), each once, in
                 arrival order, until the edge is stopped; a file is read once its size and
                 time are the same at two looks (--watch-poll apart): a writer that can stall
                 mid-file writes .NAME.png (dot files are ignored) and renames it into place
  camera:INDEX   a camera through OpenCV: camera:0 or camera:/dev/video0
                 (needs pip install 'fedshift[camera]')
  stdin:HxWxC    raw uint8 frames back to back on standard input
Image sources (folder, watch, camera) are converted to RGB (gray for a 1-channel model) and
resized to the model's input (bilinear, whole picture); npz, npy and stdin images must have its
size already. The preprocessing (scale, mean, std) comes from the model's ONNX metadata."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeBatch:
    """One batch as the node consumes it."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray | None  # int64 (N,) or None
    corruption: str
    severity: int
    reset: bool  # start a new episode before predicting this batch
    reference: np.ndarray | None = None  # int64 (N,): reference labels for the oracle selection

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def head(self, n: int) -> "EdgeBatch":
        """The first ``n`` samples of this batch."""
        cut = (lambda a: None if a is None else a[:n])
        return EdgeBatch(self.images[:n], cut(self.labels), self.corruption, self.severity, self.reset,
                         cut(self.reference))


class Source(Protocol):
    """What :class:`edge.node.EdgeNode` reads from."""

    def __iter__(self) -> Iterator[EdgeBatch]: ...


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` as an int, refused below 1 (every source checks it the same way)."""
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return int(batch_size)


# ------------------------------------------------------------------------------------- npz streams


class NpzSource:
    """Batches of a stream .npz; ``reset`` per the protocol recorded in the file."""

    def __init__(self, path: str | os.PathLike, batch_size: int) -> None:
        self.batch_size = check_batch_size(batch_size)
        self.stream = load_stream_npz(path)
        self.path = Path(path)
        log.info("stream %s: %d segments, %d samples, protocol %s", self.path, len(self.stream.segments),
                 self.stream.num_samples, self.stream.protocol)

    @property
    def protocol(self) -> str:
        return self.stream.protocol

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the stream's images."""
        return tuple(self.stream.segments[0].images.shape[1:])  # type: ignore[return-value]

    def __iter__(self) -> Iterator[EdgeBatch]:
        first = True
        for seg in self.stream.segments:
            start_of_segment = True
            for lo in range(0, len(seg.images), self.batch_size):
                hi = lo + self.batch_size
                reset = first or (start_of_segment and self.protocol == "reset")
                yield EdgeBatch(seg.images[lo:hi], None if seg.labels is None else seg.labels[lo:hi],
                                seg.corruption, seg.severity, reset,
                                None if seg.reference is None else seg.reference[lo:hi])
                first = start_of_segment = False


# ------------------------------------------------------------------------------------- npy arrays


class NpySource:
    """A uint8 ``(N, H, W, C)`` array file (``np.save``): unlabelled, one segment named after the
    file, severity 0, reset at the start only. Memory-mapped, so a board replays a file larger
    than its memory; each batch is copied out of the map."""

    def __init__(self, path: str | os.PathLike, batch_size: int) -> None:
        self.batch_size = check_batch_size(batch_size)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"array file not found: {self.path}")
        try:
            images = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{self.path}: not a readable .npy file ({exc})") from exc
        if not isinstance(images, np.ndarray):  # np.load opened an .npz archive
            images.close()
            raise ValueError(f"{self.path}: an .npz archive, not one array: use npz:PATH for stream files")
        check_images(images, f"{self.path}: images")
        if not len(images):
            raise ValueError(f"{self.path}: no images (an empty array)")
        self.images = images
        log.info("array %s: %d images of %s (HxWxC), unlabelled", self.path, len(images), images.shape[1:])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the file's images."""
        return tuple(int(v) for v in self.images.shape[1:])  # type: ignore[return-value]

    def __iter__(self) -> Iterator[EdgeBatch]:
        name = self.path.stem or "npy"
        for lo in range(0, len(self.images), self.batch_size):
            yield EdgeBatch(np.array(self.images[lo:lo + self.batch_size]), None, name, 0, lo == 0)


# ------------------------------------------------------------------------------------- folders


class FolderSource:
    """Images under a folder (recursively, sorted), fitted to the model's input (:mod:`edge.images`).

    With ``class_names`` and an ImageFolder layout (``DIR/<class>/img.png``, every parent folder a
    class name) the parent folder gives the label; otherwise the stream is unlabelled. One segment,
    named after the folder, severity 0, reset at the start only.
    """

    def __init__(self, directory: str | os.PathLike, batch_size: int, image_size: int | Sequence[int],
                 *, channels: int = 3, class_names: Sequence[str] | None = None) -> None:
        require_pillow()
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.directory}")
        self.batch_size = check_batch_size(batch_size)
        self.size = InputSize.of(image_size, channels)
        self.files = sorted(p for p in self.directory.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"{self.directory}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.labels = self._labels(class_names)
        log.info("folder %s: %d images, %s", self.directory, len(self.files),
                 "labelled by sub-folder" if self.labels is not None else "unlabelled")

    def _labels(self, class_names: Sequence[str] | None) -> np.ndarray | None:
        if not class_names:
            return None
        index = {name: i for i, name in enumerate(class_names)}
        parents = [p.parent.name for p in self.files]
        if all(p.parent != self.directory and name in index for p, name in zip(self.files, parents)):
            return np.array([index[name] for name in parents], dtype=np.int64)
        return None

    def __iter__(self) -> Iterator[EdgeBatch]:
        name = self.directory.name or "folder"
        for lo in range(0, len(self.files), self.batch_size):
            chunk = self.files[lo:lo + self.batch_size]
            images = np.stack([read_image(p, self.size) for p in chunk])
            labels = None if self.labels is None else self.labels[lo:lo + len(chunk)]
            yield EdgeBatch(images, labels, name, 0, lo == 0)


# ------------------------------------------------------------------------------------- stdin


def _selectable_fd(stream: BinaryIO) -> int | None:
    """The descriptor to read ``stream`` through, bypassing any buffer; None where that is not
    safe -- not POSIX, no descriptor, or a buffered stream other than stdin's (its buffer may hold
    bytes already; nothing reads stdin's before the source does): the stream's own ``read`` then."""
    stdin = getattr(sys.stdin, "buffer", None)  # None: no stdin, or one replaced by a text stream
    if os.name != "posix" or not ((stdin is not None and stream is stdin) or isinstance(stream, io.RawIOBase)):
        return None
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


class StdinSource:
    """Raw uint8 HxWxC frames back to back (e.g. from a camera pipe); unlabelled, one segment.

    A batch is yielded once ``batch_size`` frames arrived (or at end of input); a truncated last
    frame is an error, not silently dropped.

    Reading a file descriptor (stdin, or a raw ``stream``) waits in ``poll`` slices of
    ``poll_s`` and reads what arrived with ``os.read``, never in one blocking ``read``: a SIGTERM
    that the kernel delivers to another thread (gRPC's, ONNX Runtime's) only flags the signal, and
    Python runs the handler when the main thread next runs Python code — a main thread blocked in
    ``read`` for input that never comes would never stop (a real hang, 1 run in ~7 here).
    """

    poll_s = 0.2

    def __init__(self, height: int, width: int, channels: int, batch_size: int,
                 stream: BinaryIO | None = None) -> None:
        if min(height, width) < 1 or channels not in (1, 3):
            raise ValueError(f"stdin frames must be HxWxC with H, W >= 1 and C in {{1, 3}}, "
                             f"got {height}x{width}x{channels}")
        self.shape = (int(height), int(width), int(channels))
        self.frame_bytes = int(np.prod(self.shape))
        self.batch_size = check_batch_size(batch_size)
        self.stream = stream if stream is not None else sys.stdin.buffer
        self._fd = _selectable_fd(self.stream)
        self._poller = None
        if self._fd is not None:
            import select

            self._poller = select.poll()  # not select.select: any descriptor number
            self._poller.register(self._fd, select.POLLIN)

    def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes (b"" at the end of input), returning to Python every ``poll_s``."""
        if self._poller is None:  # no selectable descriptor: a plain blocking read
            return self.stream.read(n)
        while not self._poller.poll(int(1000 * self.poll_s)):
            pass
        return os.read(self._fd, n)  # b"" at the end of input (POLLHUP)

    def _read_frame(self) -> bytes | None:
        """Exactly one frame, None at a clean end of input (pipes return short reads)."""
        parts, got = [], 0
        while got < self.frame_bytes:
            chunk = self._read(self.frame_bytes - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        if got == 0:
            return None
        if got < self.frame_bytes:
            raise ValueError(f"stdin: truncated frame, got {got} of {self.frame_bytes} bytes "
                             f"({'x'.join(map(str, self.shape))} uint8)")
        return b"".join(parts)

    def __iter__(self) -> Iterator[EdgeBatch]:
        first = True
        while True:
            frames = []
            while len(frames) < self.batch_size:
                frame = self._read_frame()
                if frame is None:
                    break
                frames.append(np.frombuffer(frame, np.uint8).reshape(self.shape))
            if frames:
                yield EdgeBatch(np.stack(frames), None, "stdin", 0, first)
                first = False
            if len(frames) < self.batch_size:
                return


# ------------------------------------------------------------------------------------- specs


def parse_frame_shape(text: str) -> tuple[int, int, int]:
    """``"32x32x3"`` -> (32, 32, 3)."""
    try:
        h, w, c = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise ValueError(f"frame shape must be HxWxC (e.g. 32x32x3), got {text!r}") from exc
    return h, w, c


def open_source(spec: str, batch_size: int, input_shape: Sequence[int],
                class_names: Sequence[str] | None = None, *, stop: threading.Event | None = None,
                poll_s: float = 0.5, capture_factory=None) -> Source:
    """Build a source from a spec (:data:`SOURCE_SPECS`; the module docstring says what each reads).

    ``input_shape`` is the model's (C, H, W): image sources fit their pictures to it, and npz / npy
    / stdin frames must already match it. ``stop`` (the node's stop event) ends the live sources
    (watch, camera); ``poll_s`` is the watched folder's poll interval; ``capture_factory`` opens a
    camera (default: OpenCV's ``VideoCapture``; tests inject a fake).
    """
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ValueError(f"source must be one of {SOURCE_SPECS}, got {spec!r}")
    c, h, w = (int(v) for v in input_shape)
    if kind in ("npz", "npy"):
        source = NpzSource(arg, batch_size) if kind == "npz" else NpySource(arg, batch_size)
        if source.image_shape != (h, w, c):
            raise ValueError(f"{arg}: images are {source.image_shape} (HxWxC), the model expects {(h, w, c)}")
        return source
    if kind == "folder":
        return FolderSource(arg, batch_size, (h, w), channels=c, class_names=class_names)
    if kind == "watch":
        from edge.watch import WatchSource

        return WatchSource(arg, batch_size, (h, w), channels=c, poll_s=poll_s, stop=stop)
    if kind == "camera":
        from edge.camera import CameraSource, parse_device

        return CameraSource(parse_device(arg), batch_size, (h, w), channels=c, capture_factory=capture_factory,
                            stop=stop)
    if kind == "stdin":
        shape = parse_frame_shape(arg)
        if shape != (h, w, c):
            raise ValueError(f"stdin frames are {arg}, the model expects {h}x{w}x{c}")
        return StdinSource(*shape, batch_size)
    raise ValueError(f"unknown source kind {kind!r}: use {SOURCE_SPECS}")
