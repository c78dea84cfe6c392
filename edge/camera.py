"""``camera:INDEX`` / ``camera:/dev/videoN``: frames of a camera through OpenCV.

OpenCV is not in the base install (it is large and only boards with a camera need it): ``pip
install 'fedshift[camera]'`` adds ``opencv-python-headless``; without it the source says so. The
capture is made by a factory (default ``cv2.VideoCapture``), so tests inject a fake and nothing
here needs hardware.

Frames arrive as OpenCV gives them, BGR (or gray, or BGRA); each is turned to RGB and fitted to the
model's input by the rule every image source uses (:mod:`edge.images`), so a camera frame and the
same picture read from a folder give the model the same pixels. A batch is yielded once
``batch_size`` frames were read (the frames in hand are yielded when the node stops or the
camera fails). Unlabelled, one segment named after the device, severity 0, reset at the first
batch only. A camera that gives no frame ``max_failed_reads`` times in a row (unplugged, or taken
by another program) ends the run with an error, so a supervisor sees the failure instead of an
edge that sits idle.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from edge.images import InputSize, fit_rgb, require_pillow
from edge.sources import EdgeBatch, check_batch_size

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'fedshift[camera]'"


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` the source uses."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's names

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...


CaptureFactory = Callable[[int | str], Capture]


def opencv_capture(device: int | str) -> Capture:
    """``cv2.VideoCapture(device)``, or an ImportError that says how to install OpenCV."""
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(f"camera sources read frames with OpenCV, which the base edge install leaves out: "
                          f"{INSTALL_HINT}") from exc
    return cv2.VideoCapture(device)


def parse_device(text: str) -> int | str:
    """``"0"`` -> 0 (a camera index); ``"/dev/video2"`` stays a path; anything else is refused."""
    if text.isdigit():
        return int(text)
    if text.startswith("/dev/") and len(text) > len("/dev/"):
        return text
    raise ValueError(f"a camera is an index or a device path (camera:0, camera:/dev/video0), got {text!r}")


def to_rgb(frame: np.ndarray) -> np.ndarray:
    """An OpenCV frame (BGR ``(H, W, 3)``, BGRA ``(H, W, 4)`` or gray ``(H, W)`` / ``(H, W, 1)``) as RGB or gray."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"the camera gave a frame of {frame.dtype} {frame.shape}, not uint8 gray, BGR or BGRA")
    if frame.ndim == 3 and frame.shape[-1] in (3, 4):
        return frame[..., 2::-1]  # B, G, R(, A) -> R, G, B
    return frame


class CameraSource:
    """Frames of one camera; the module docstring has the rules."""

    def __init__(self, device: int | str, batch_size: int, image_size: int | Sequence[int], *, channels: int = 3,
                 capture_factory: CaptureFactory | None = None, stop: threading.Event | None = None,
                 max_failed_reads: int = 50, retry_s: float = 0.1) -> None:
        require_pillow()
        self.device = device
        self.batch_size = check_batch_size(batch_size)
        self.size = InputSize.of(image_size, channels)
        if max_failed_reads < 1 or retry_s < 0:
            raise ValueError(f"max_failed_reads must be >= 1 and retry_s >= 0, got {max_failed_reads}, {retry_s}")
        self.max_failed_reads = int(max_failed_reads)
        self.retry_s = float(retry_s)
        self.stop = stop
        self.frames_read = 0
        self._capture = (capture_factory or opencv_capture)(device)
        if not self._capture.isOpened():
            self._capture.release()
            raise ValueError(f"cannot open camera {device!r} (no such device, or another program holds it)")
        log.info("camera %s opened", device)

    @property
    def name(self) -> str:
        return f"camera{self.device}" if isinstance(self.device, int) else str(self.device).rsplit("/", 1)[-1]

    def close(self) -> None:
        """Release the camera (iteration does it when it ends; this is for a source never iterated)."""
        self._capture.release()

    def _stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _frame(self) -> np.ndarray | None:
        """The next frame fitted to the model; None when asked to stop; RuntimeError when the camera is gone."""
        failures = 0
        while not self._stopped():
            ok, frame = self._capture.read()
            if ok and frame is not None:
                self.frames_read += 1
                return fit_rgb(to_rgb(frame), self.size)
            failures += 1
            if failures >= self.max_failed_reads:
                raise RuntimeError(f"camera {self.device!r} gave no frame in {failures} reads (unplugged?)")
            if self.stop is not None:
                self.stop.wait(self.retry_s)
            else:
                time.sleep(self.retry_s)
        return None

    def __iter__(self) -> Iterator[EdgeBatch]:
        first = True
        try:
            while True:
                frames: list[np.ndarray] = []
                failure: RuntimeError | None = None
                try:
                    while len(frames) < self.batch_size and (frame := self._frame()) is not None:
                        frames.append(frame)
                except RuntimeError as exc:  # the frames in hand are still predicted first
                    failure = exc
                if frames:
                    yield EdgeBatch(np.stack(frames), None, self.name, 0, first)
                    first = False
                if failure is not None:
                    raise failure
                if len(frames) < self.batch_size:  # stopped
                    return
        finally:
            self.close()
