"""Local image augmentation: the family the FRAug and FedBN authors train with (random resized
crop, colour jitter, random greyscale), one job, explicit seeded generators.

Random parameters come from a ``numpy.random.Generator`` the caller owns (never torch's global
RNG), one draw set per image, so a client's round is reproducible from its seed; the image ops
are torchvision's. Images are float NCHW in [0, 1] -- before the model's normalisation -- as the
authors' ``transforms`` see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class CropColour:
    """RandomResizedCrop(scale, ratio) → ColorJitter(b, c, s, h) → RandomGrayscale(p).

    ``scale`` starts at 0.5 rather than torchvision's 0.08: the images here are 16-32 px, and a
    crop of 8% of a 16-px glyph holds no glyph. Jitter factors are drawn as torchvision does
    (uniform in [1 - x, 1 + x], hue in [-h, h]) and applied in a fixed order."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    grayscale_p: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("jitter strengths must be >= 0 and hue in [0, 0.5]")
        if not 0 <= self.grayscale_p <= 1:
            raise ValueError(f"grayscale_p must lie in [0, 1], got {self.grayscale_p}")


def crop_box(height: int, width: int, spec: CropColour, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area in ``scale`` and aspect in ``ratio`` --
    torchvision's RandomResizedCrop rule (10 tries, then the centre crop) on our generator."""
    area = height * width
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        h, w = height, int(round(height * spec.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_batch(x: torch.Tensor, rng: np.random.Generator, spec: CropColour = CropColour()) -> torch.Tensor:
    """A new tensor: every image of ``x`` (float NCHW in [0, 1]) cropped, jittered, maybe greyed."""
    if x.ndim != 4:
        raise ValueError(f"expected NCHW images, got shape {tuple(x.shape)}")
    n, c, height, width = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        top, left, h, w = crop_box(height, width, spec, rng)
        img = TF.resized_crop(x[i], top, left, h, w, [height, width], antialias=True)
        img = TF.adjust_brightness(img, float(rng.uniform(1 - spec.brightness, 1 + spec.brightness)))
        img = TF.adjust_contrast(img, float(rng.uniform(1 - spec.contrast, 1 + spec.contrast)))
        if c == 3:
            img = TF.adjust_saturation(img, float(rng.uniform(1 - spec.saturation, 1 + spec.saturation)))
            img = TF.adjust_hue(img, float(rng.uniform(-spec.hue, spec.hue)))
            if rng.random() < spec.grayscale_p:
                img = TF.rgb_to_grayscale(img, num_output_channels=3)
        out[i] = img.clamp(0.0, 1.0)
    return out
