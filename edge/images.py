"""Decoded pictures -> uint8 images of the model's input size: the one rule every image source uses.

Why one place: a folder of files, a watched folder and a camera must hand the model the same
pixels for the same picture, so they share this rule: convert to RGB (``L``, Pillow's ITU-R 601-2
luma, for a one-channel model), then, when the size differs, resize the whole picture to the
model's W x H with Pillow's bilinear filter (no crop; the aspect ratio is not kept). The float
preprocessing (scale, mean, std) is not done here: it comes from the ONNX metadata and the
runtime applies it (``protos.contract.Preprocess``).

Pillow is a base dependency; the import is still guarded, so an install made with ``--no-deps``
says what is missing instead of failing deep inside a source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})


def require_pillow():
    """Pillow's ``Image`` module, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("image sources decode and resize with Pillow, a dependency of the base edge install "
                          "that is missing here: pip install Pillow") from exc
    return Image


@dataclass(frozen=True)
class InputSize:
    """The model's input as a source must deliver it: uint8 (H, W, C)."""

    height: int
    width: int
    channels: int = 3

    def __post_init__(self) -> None:
        if min(self.height, self.width) < 1 or self.channels not in (1, 3):
            raise ValueError(f"image size must be HxWxC with H, W >= 1 and C in {{1, 3}}, "
                             f"got {self.height}x{self.width}x{self.channels}")

    @classmethod
    def of(cls, image_size: int | Sequence[int], channels: int = 3) -> "InputSize":
        """From ``size`` (square) or ``(height, width)``."""
        if isinstance(image_size, int):
            return cls(image_size, image_size, channels)
        height, width = (int(v) for v in image_size)
        return cls(height, width, channels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.channels


def fit(image, size: InputSize) -> np.ndarray:
    """A Pillow image -> uint8 ``size.shape`` by the module's rule."""
    pil = require_pillow()
    image = image.convert("RGB" if size.channels == 3 else "L")
    if image.size != (size.width, size.height):
        image = image.resize((size.width, size.height), pil.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(size.shape)


def read_image(path: str | os.PathLike, size: InputSize) -> np.ndarray:
    """Decode an image file and fit it; ``ValueError`` naming the file when it cannot be read."""
    pil = require_pillow()
    try:
        with pil.open(path) as img:
            return fit(img, size)
    except (OSError, ValueError) as exc:  # Pillow's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def fit_rgb(frame: np.ndarray, size: InputSize) -> np.ndarray:
    """An RGB ``(H, W, 3)`` or gray ``(H, W)`` / ``(H, W, 1)`` uint8 array -> uint8 ``size.shape``."""
    pil = require_pillow()
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[-1] in (1, 3))):
        raise ValueError(f"a frame must be uint8 (H, W), (H, W, 1) or (H, W, 3), got {frame.dtype} {frame.shape}")
    if frame.ndim == 3 and frame.shape[-1] == 1:
        frame = frame[..., 0]
    return fit(pil.fromarray(np.ascontiguousarray(frame)), size)  # 2-D: "L", (H, W, 3): "RGB"
