"""Domain styles for the built-in digits benchmark: one 8x8 digit, five looks.

Each style imitates one of the Digits-5 domains FedBN and FRAug train on (MNIST, inverted
MNIST, MNIST-M, USPS, SVHN) so that clients differ in their *features* while sharing labels.
Everything is vectorised over the batch and driven only by the rng passed in.

Geometry is done with separable, axis-aligned resampling: each image is a 4x super-sampled
bicubic version of the 8x8 digit, read through per-image scale/shift with a triangle filter
that widens when shrinking (so small outputs are anti-aliased, not aliased).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

DOMAINS: tuple[str, ...] = ("mnist", "inverse", "mnistm", "usps", "svhn")

_SUPER = 4  # super-sampling factor of the smooth digit source (8x8 -> 32x32)
_DIGIT = 8.0  # side of the source digit, in source pixels
_LUMA = np.array([0.299, 0.587, 0.114])


def render(digits: np.ndarray, domain: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render (N, 8, 8) digits with values in [0, 16] as (N, size, size, 3) uint8 in a style."""
    if domain not in _RENDERERS:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    digits = np.asarray(digits, dtype=np.float64)
    if digits.ndim != 3 or digits.shape[1:] != (8, 8):
        raise ValueError(f"digits must be (N, 8, 8), got {digits.shape}")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    ink = np.clip(digits / 16.0, 0.0, 1.0)
    rgb = _RENDERERS[domain](ink, int(size), rng)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- geometry


def _smooth_source(ink: np.ndarray) -> np.ndarray:
    """(N, 8, 8) -> (N, 32, 32) bicubic, zero outside the digit box; smooth strokes."""
    # Spline zoom is separable: zooming the 8 unit impulses gives the 1-D operator, applied
    # to rows and columns of the whole batch at once (much faster than zooming a 3-D array).
    impulses = ndimage.zoom(np.eye(8), (1, _SUPER), order=3, mode="grid-constant",
                            grid_mode=True)  # (8, 32): response of each source pixel
    fine = np.einsum("iy,nij,jx->nyx", impulses, ink, impulses, optimize=True)
    return np.clip(fine, 0.0, 1.0)


def _resample_weights(pos: np.ndarray, n_src: int, step: np.ndarray | float) -> np.ndarray:
    """Triangle-filter weights (..., n_src) for sampling at source coordinates `pos` (...).

    `step` is the source distance between neighbouring output pixels: above 1 the filter
    widens to average what it skips. Positions outside the source get zero weight (black pad).
    """
    width = np.maximum(1.0, np.asarray(step, dtype=np.float64))[..., None]
    pad = int(np.ceil(width.max(initial=1.0)))
    # Normalise over a zero-padded source so the weights sum to 1 at every position (a
    # triangle of non-integer width does not, which would draw a grid over the image).
    dist = np.abs(pos[..., None] - np.arange(-pad, n_src + pad))
    weights = np.maximum(0.0, 1.0 - dist / width)
    weights /= np.maximum(weights.sum(axis=-1, keepdims=True), 1e-12)
    return weights[..., pad : pad + n_src]


def _place(fine: np.ndarray, size: int, centre: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Sample (N, size, size) from the super-sampled digits.

    centre: (N, 2) point of the 8x8 digit (row, col; 0..8) at the image centre.
    span: (N,) how many digit pixels the output side covers (8 = the digit box exactly).
    """
    n_src = fine.shape[1]
    u = (np.arange(size) + 0.5) / size - 0.5  # output pixel centres, -0.5..0.5
    pos = centre[:, :, None] + u[None, None, :] * span[:, None, None]  # (N, 2, S) digit px
    pos = pos * _SUPER - 0.5  # -> super-sampled pixel index
    step = span * _SUPER / size  # (N,)
    w_rows = _resample_weights(pos[:, 0], n_src, step[:, None])  # (N, S, n_src)
    w_cols = _resample_weights(pos[:, 1], n_src, step[:, None])
    return np.clip(np.einsum("nsy,nyx,ntx->nst", w_rows, fine, w_cols, optimize=True), 0, 1)


def _centred(n: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and span that put the digit box in the middle, covering `fill` of the side."""
    return np.full((n, 2), _DIGIT / 2), np.full(n, _DIGIT / fill)


def _ink_box(ink: np.ndarray, threshold: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Centre (N, 2) and side (N,) of the square around each digit's ink (whole box if none)."""
    centres, sides = [], []
    for axis in (2, 1):  # rows: reduce over columns; cols: reduce over rows
        present = (ink > threshold).any(axis=axis)  # (N, 8)
        first = np.argmax(present, axis=1)
        last = 7 - np.argmax(present[:, ::-1], axis=1)
        empty = ~present.any(axis=1)
        first, last = np.where(empty, 0, first), np.where(empty, 7, last)
        centres.append((first + last + 1) / 2.0)
        sides.append(last - first + 1.0)
    return np.stack(centres, axis=1), np.maximum(sides[0], sides[1])


def _upsample_grid(noise: np.ndarray, size: int) -> np.ndarray:
    """(N, g, g, C) coarse grid -> (N, size, size, C), bilinear with edge clamping."""
    g = noise.shape[1]
    pos = np.clip((np.arange(size) + 0.5) / size * g - 0.5, 0, g - 1)
    w = _resample_weights(pos, g, 1.0)  # (S, g)
    return np.einsum("sy,nyxc,tx->nstc", w, noise, w, optimize=True)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two spatial axes of (N, S, S) or (N, S, S, C)."""
    spatial = (0, sigma, sigma) + (0,) * (img.ndim - 3)
    return ndimage.gaussian_filter(img, sigma=spatial, mode="nearest")


def _grey(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1)


# --------------------------------------------------------------------------- styles


def _mnist(ink: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """White digit on black, grey, with MNIST's ~20/28 margin."""
    del rng  # deterministic style
    centre, span = _centred(len(ink), 0.72)
    return _grey(_place(_smooth_source(ink), size, centre, span))


def _inverse(ink: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark digit on a light background, both tinted with a random per-image hue."""
    n = len(ink)
    centre, span = _centred(n, 0.72)
    digit = _place(_smooth_source(ink), size, centre, span)[..., None]
    background = rng.uniform(0.55, 1.0, size=(n, 1, 1, 3))
    foreground = background * rng.uniform(0.0, 0.3, size=(n, 1, 1, 1))
    return background * (1.0 - digit) + foreground * digit


def _colour_texture(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A stand-in for MNIST-M's BSDS500 photo patches: blobs of a few random colours per
    image (smooth multi-scale noise picks the colour) plus fine luminance grain."""
    palette = rng.random((n, 3, 3))  # three colours (k) of three channels (c) per image
    field = sum(w * _upsample_grid(rng.random((n, g, g, 3)), size)
                for g, w in ((3, 0.6), (7, 0.4)))
    choice = np.exp(12.0 * (field - field.max(axis=3, keepdims=True)))  # soft argmax
    choice /= choice.sum(axis=3, keepdims=True)
    texture = np.einsum("nstk,nkc->nstc", choice, palette)
    grain = _upsample_grid(rng.random((n, max(2, size // 3), max(2, size // 3), 1)), size)
    return np.clip(texture + 0.25 * (grain - 0.5), 0.0, 1.0)


def _mnistm(ink: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """MNIST-M: |background - digit| over a colour texture (the digit inverts the texture)."""
    centre, span = _centred(len(ink), 0.72)
    digit = _place(_smooth_source(ink), size, centre, span)[..., None]
    return np.abs(_colour_texture(len(ink), size, rng) - digit)


def _usps(ink: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """USPS: digit scaled (aspect kept) to fill the frame, blurred, grey, low contrast."""
    n = len(ink)
    centre, side = _ink_box(ink)
    digit = _blur(_place(_smooth_source(ink), size, centre, side + 0.4), 0.45 * size / 16)
    low = rng.uniform(0.1, 0.25, size=(n, 1, 1))
    high = low + rng.uniform(0.4, 0.55, size=(n, 1, 1))
    return _grey(low + (high - low) * digit)


def _svhn_mask(ink: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Jittered, rescaled digit plus fainter fragments of neighbouring digits at the sides."""
    n = len(ink)
    fine = _smooth_source(ink)
    centre = _DIGIT / 2 + rng.uniform(-0.7, 0.7, size=(n, 2))
    span = _DIGIT / rng.uniform(0.6, 0.85, size=n)
    mask = _place(fine, size, centre, span)
    for side in (-1.0, 1.0):  # a neighbour's edge peeks in at the left / right border
        neighbour = fine[rng.permutation(n)]
        offset = np.stack([rng.uniform(-1.0, 1.0, n), side * rng.uniform(8.0, 9.5, n)], axis=1)
        faint = rng.uniform(0.35, 0.7, size=(n, 1, 1))
        mask = np.maximum(mask, faint * _place(neighbour, size, centre - offset, span))
    return mask


def _svhn(ink: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """SVHN: random palette per image, uneven lighting, blur and sensor noise."""
    n = len(ink)
    mask = _svhn_mask(ink, size, rng)[..., None]
    background = rng.random((n, 3))
    polarity = np.where(background @ _LUMA < 0.5, 1.0, -1.0)[:, None]  # light on dark or v.v.
    contrast = polarity * rng.uniform(0.35, 0.65, (n, 1))
    foreground = background + contrast + rng.normal(0.0, 0.12, (n, 3))
    img = background[:, None, None] + (np.clip(foreground, 0, 1) - background)[:, None, None] * mask
    angle = rng.uniform(0, 2 * np.pi, n)
    u = (np.arange(size) + 0.5) / size - 0.5
    ramp = np.cos(angle)[:, None, None] * u[None, :, None] + np.sin(angle)[:, None, None] * u
    img = img * (1.0 + rng.uniform(0.0, 0.5, (n, 1, 1)) * ramp)[..., None]
    img = _blur(img, 0.4 * size / 32)
    return img + rng.normal(0.0, 1.0, img.shape) * rng.uniform(0.02, 0.07, (n, 1, 1, 1))


_RENDERERS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "mnist": _mnist,
    "inverse": _inverse,
    "mnistm": _mnistm,
    "usps": _usps,
    "svhn": _svhn,
}
