"""The camera source (``camera:INDEX``) with a fake capture injected: BGR -> RGB, the folder source's
resize rule, batches, the node's stop, a camera that fails, and the errors a board user meets
(no OpenCV, no camera, a bad spec)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from edge.camera import CameraSource, parse_device, to_rgb
from edge.sources import FolderSource, open_source

Image = pytest.importorskip("PIL.Image")


class FakeCapture:
    """Gives ``frames`` (BGR, as OpenCV does), then fails every read; records what was asked of it."""

    def __init__(self, frames, opened: bool = True, on_read=None) -> None:
        self.frames, self.opened, self.on_read = list(frames), opened, on_read
        self.reads = 0
        self.released = 0

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.opened

    def read(self):
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self.reads)
        if not self.frames:
            return False, None
        return True, self.frames.pop(0)

    def release(self) -> None:
        self.released += 1


def _factory(capture: FakeCapture, opened_with: list):
    def make(device):
        opened_with.append(device)
        return capture
    return make


def _rgb(n: int, h: int = 10, w: int = 12) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_frames_are_rgb_and_resized_like_a_folder_of_the_same_pictures(tmp_path) -> None:
    rgb = _rgb(5)
    for i, frame in enumerate(rgb):
        Image.fromarray(frame).save(tmp_path / f"{i}.png")
    capture, opened = FakeCapture([f[..., ::-1].copy() for f in rgb]), []  # OpenCV gives BGR
    stop = threading.Event()
    capture.on_read = lambda n: stop.set() if n > 5 else None  # the node stops while frame 6 is awaited
    src = CameraSource(2, batch_size=2, image_size=(8, 6), capture_factory=_factory(capture, opened), stop=stop)
    batches = list(src)
    assert opened == [2] and capture.released == 1
    assert [len(b) for b in batches] == [2, 2, 1]  # the frame in hand when the node stopped is predicted
    assert [b.reset for b in batches] == [True, False, False]
    assert all(b.labels is None and b.corruption == "camera2" and b.severity == 0 for b in batches)
    folder = np.concatenate([b.images for b in FolderSource(tmp_path, 5, (8, 6))])
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), folder)
    assert folder.shape == (5, 8, 6, 3) and src.frames_read == 5


def test_gray_models_gray_and_bgra_frames() -> None:
    rgb = _rgb(2, 8, 8)
    bgra = np.concatenate([rgb[..., ::-1], np.full((2, 8, 8, 1), 255, np.uint8)], axis=-1)
    gray_frame = rgb[0, ..., 0].copy()
    capture = FakeCapture([bgra[0], bgra[1], gray_frame])
    stop = threading.Event()
    capture.on_read = lambda n: stop.set() if n > 3 else None
    batches = list(CameraSource(0, 8, 8, channels=1, capture_factory=lambda d: capture, stop=stop))
    images = batches[0].images
    assert images.shape == (3, 8, 8, 1)
    for i in range(2):  # Pillow's luma of the RGB picture, as a folder of the same files gives
        np.testing.assert_array_equal(images[i, ..., 0], np.asarray(Image.fromarray(rgb[i]).convert("L")))
    np.testing.assert_array_equal(images[2, ..., 0], gray_frame)
    np.testing.assert_array_equal(to_rgb(bgra[0]), rgb[0])
    with pytest.raises(ValueError, match="not uint8 gray, BGR or BGRA"):
        to_rgb(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="not uint8 gray, BGR or BGRA"):
        to_rgb(np.zeros((4, 4, 3), np.float32))


def test_a_camera_that_stops_giving_frames_ends_the_run_with_an_error() -> None:
    capture = FakeCapture(list(_rgb(3, 8, 8)))
    src = CameraSource("/dev/video7", 2, 8, capture_factory=lambda d: capture, max_failed_reads=4, retry_s=0)
    it = iter(src)
    assert len(next(it)) == 2
    assert len(next(it)) == 1  # the frame in hand is predicted first ...
    with pytest.raises(RuntimeError, match=r"'/dev/video7' gave no frame in 4 reads"):
        next(it)  # ... then the failure ends the run
    assert capture.reads == 3 + 4 and capture.released == 1


def test_camera_errors_a_board_user_meets(monkeypatch) -> None:
    with pytest.raises(ValueError, match="cannot open camera 3"):
        CameraSource(3, 2, 8, capture_factory=lambda d: FakeCapture([], opened=False))
    with pytest.raises(ValueError, match="batch size"):
        CameraSource(0, 0, 8, capture_factory=lambda d: FakeCapture([]))
    assert parse_device("0") == 0 and parse_device("12") == 12 and parse_device("/dev/video2") == "/dev/video2"
    for bad in ("front", "-1", "/dev/", "video0", "1.5"):
        with pytest.raises(ValueError, match="camera:0, camera:/dev/video0"):
            parse_device(bad)
    fake = FakeCapture([])
    src = open_source("camera:/dev/video4", 2, (3, 8, 8), capture_factory=lambda d: fake)
    assert isinstance(src, CameraSource) and src.device == "/dev/video4" and src.name == "video4"
    monkeypatch.setitem(sys.modules, "cv2", None)  # an edge-only install: no OpenCV
    with pytest.raises(ImportError, match=r"pip install 'fedshift\[camera\]'"):
        open_source("camera:0", 2, (3, 8, 8))


def test_a_missing_device_through_real_opencv() -> None:
    pytest.importorskip("cv2")
    with pytest.raises(ValueError, match="cannot open camera '/dev/video97'"):
        open_source("camera:/dev/video97", 2, (3, 8, 8))
