"""Domain styles of the built-in benchmarks: one ink mask, five looks.

Each style imitates one of the Digits-5 domains FedBN and FRAug train on (MNIST, inverted
MNIST, MNIST-M, USPS, SVHN) so that clients differ in their *features* while sharing labels.
Everything is vectorised over the batch and driven only by the rng passed in.

The styles read a *fine ink mask*: (N, F, F) values in [0, 1] whose whole square is the
character's box (a digit's 8x8 frame), drawn at a resolution finer than the output.
:func:`render_ink` styles such masks directly (glyph-shift's rendered fonts); :func:`render`
first turns digits-shift's 8x8 digits into one (a 4x super-sampled bicubic version) and keeps
their ink box from the 8x8 grid, so its output is what it always was.

Geometry is done with separable, axis-aligned resampling: the mask is read through per-image
scale/shift with a triangle filter that widens when shrinking (so small outputs are
anti-aliased, not aliased). Lengths in the styles are in *box units*: the box is 8 units wide
(a digit pixel), whatever the mask's resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy import ndimage

DOMAINS: tuple[str, ...] = ("mnist", "inverse", "mnistm", "usps", "svhn")

_SUPER = 4  # super-sampling factor of the smooth digit source (8x8 -> 32x32)
_DIGIT = 8.0  # side of the ink box, in box units (a digit's pixels)
_INK_THRESHOLD = 0.2  # ink above this counts for the ink box (usps framing)
_LUMA = np.array([0.299, 0.587, 0.114])


class _Source(NamedTuple):
    """What a style reads: the fine mask and each image's ink box (centre (N, 2) as row, col,
    and side (N,)), both in box units."""

    fine: np.ndarray
    box_centre: np.ndarray
    box_side: np.ndarray


def check_domains(domains: object) -> tuple[str, ...]:
    """The domain names as a tuple, refused when empty, unknown, repeated or a bare string."""
    if isinstance(domains, str):
        raise ValueError(f"domains must be a sequence of names, got the string {domains!r}")
    doms = tuple(domains)  # type: ignore[arg-type]
    unknown = [d for d in doms if d not in DOMAINS]
    if not doms or unknown:
        raise ValueError(f"unknown or no domains {unknown or doms}; valid: {', '.join(DOMAINS)}")
    if len(set(doms)) != len(doms):
        raise ValueError(f"domains must not repeat (use clients_per_domain), got {doms}")
    return doms


def render(digits: np.ndarray, domain: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render (N, 8, 8) digits with values in [0, 16] as (N, size, size, 3) uint8 in a style."""
    _check_style(domain, size)
    digits = np.asarray(digits, dtype=np.float64)
    if digits.ndim != 3 or digits.shape[1:] != (8, 8):
        raise ValueError(f"digits must be (N, 8, 8), got {digits.shape}")
    ink = np.clip(digits / 16.0, 0.0, 1.0)
    centre, side = _ink_box(ink, unit=1.0)
    return _style(_Source(_smooth_source(ink), centre, side), domain, int(size), rng)


def render_ink(fine_ink: np.ndarray, domain: str, size: int,
               rng: np.random.Generator) -> np.ndarray:
    """Render (N, F, F) ink masks with values in [0, 1] (F >= 8; the square is the character's
    box) as (N, size, size, 3) uint8 in a domain style."""
    _check_style(domain, size)
    fine = np.asarray(fine_ink, dtype=np.float64)
    if fine.ndim != 3 or fine.shape[1] != fine.shape[2] or fine.shape[1] < 8:
        raise ValueError(f"fine_ink must be (N, F, F) with F >= 8, got {fine.shape}")
    if not np.isfinite(fine).all():
        raise ValueError("fine_ink has non-finite values")
    fine = np.clip(fine, 0.0, 1.0)
    centre, side = _ink_box(fine, unit=fine.shape[1] / _DIGIT)
    return _style(_Source(fine, centre, side), domain, int(size), rng)


def _check_style(domain: str, size: int) -> None:
    if domain not in _RENDERERS:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")


def _style(src: _Source, domain: str, size: int, rng: np.random.Generator) -> np.ndarray:
    rgb = _RENDERERS[domain](src, size, rng)
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
    """Sample (N, size, size) from the fine masks.

    centre: (N, 2) point of the box (row, col; 0..8 box units) at the image centre.
    span: (N,) how many box units the output side covers (8 = the box exactly).
    """
    n_src = fine.shape[1]
    unit = n_src / _DIGIT  # fine pixels per box unit (4 for the super-sampled digits)
    u = (np.arange(size) + 0.5) / size - 0.5  # output pixel centres, -0.5..0.5
    pos = centre[:, :, None] + u[None, None, :] * span[:, None, None]  # (N, 2, S) box units
    pos = pos * unit - 0.5  # -> fine pixel index
    step = span * unit / size  # (N,)
    w_rows = _resample_weights(pos[:, 0], n_src, step[:, None])  # (N, S, n_src)
    w_cols = _resample_weights(pos[:, 1], n_src, step[:, None])
    return np.clip(np.einsum("nsy,nyx,ntx->nst", w_rows, fine, w_cols, optimize=True), 0, 1)


def _centred(n: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and span that put the digit box in the middle, covering `fill` of the side."""
    return np.full((n, 2), _DIGIT / 2), np.full(n, _DIGIT / fill)


def _ink_box(ink: np.ndarray, unit: float,
             threshold: float = _INK_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Centre (N, 2) and side (N,), in box units, of the square around each image's ink
    (whole box if none); `unit` is the pixels of `ink` per box unit."""
    centres, sides = [], []
    n_px = ink.shape[1]
    for axis in (2, 1):  # rows: reduce over columns; cols: reduce over rows
        present = (ink > threshold).any(axis=axis)  # (N, F)
        first = np.argmax(present, axis=1)
        last = n_px - 1 - np.argmax(present[:, ::-1], axis=1)
        empty = ~present.any(axis=1)
        first, last = np.where(empty, 0, first), np.where(empty, n_px - 1, last)
        centres.append((first + last + 1) / 2.0 / unit)
        sides.append((last - first + 1.0) / unit)
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


def _mnist(src: _Source, size: int, rng: np.random.Generator) -> np.ndarray:
    """White digit on black, grey, with MNIST's ~20/28 margin."""
    del rng  # deterministic style
    centre, span = _centred(len(src.fine), 0.72)
    return _grey(_place(src.fine, size, centre, span))


def _inverse(src: _Source, size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark digit on a light background, both tinted with a random per-image hue."""
    n = len(src.fine)
    centre, span = _centred(n, 0.72)
    digit = _place(src.fine, size, centre, span)[..., None]
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


def _mnistm(src: _Source, size: int, rng: np.random.Generator) -> np.ndarray:
    """MNIST-M: |background - digit| over a colour texture (the digit inverts the texture)."""
    n = len(src.fine)
    centre, span = _centred(n, 0.72)
    digit = _place(src.fine, size, centre, span)[..., None]
    return np.abs(_colour_texture(n, size, rng) - digit)


def _usps(src: _Source, size: int, rng: np.random.Generator) -> np.ndarray:
    """USPS: digit scaled (aspect kept) to fill the frame, blurred, grey, low contrast."""
    n = len(src.fine)
    centre, side = src.box_centre, src.box_side
    digit = _blur(_place(src.fine, size, centre, side + 0.4), 0.45 * size / 16)
    low = rng.uniform(0.1, 0.25, size=(n, 1, 1))
    high = low + rng.uniform(0.4, 0.55, size=(n, 1, 1))
    return _grey(low + (high - low) * digit)


def _svhn_mask(src: _Source, size: int, rng: np.random.Generator) -> np.ndarray:
    """Jittered, rescaled digit plus fainter fragments of neighbouring digits at the sides."""
    fine = src.fine
    n = len(fine)
    centre = _DIGIT / 2 + rng.uniform(-0.7, 0.7, size=(n, 2))
    span = _DIGIT / rng.uniform(0.6, 0.85, size=n)
    mask = _place(fine, size, centre, span)
    for side in (-1.0, 1.0):  # a neighbour's edge peeks in at the left / right border
        neighbour = fine[rng.permutation(n)]
        offset = np.stack([rng.uniform(-1.0, 1.0, n), side * rng.uniform(8.0, 9.5, n)], axis=1)
        faint = rng.uniform(0.35, 0.7, size=(n, 1, 1))
        mask = np.maximum(mask, faint * _place(neighbour, size, centre - offset, span))
    return mask


def _svhn(src: _Source, size: int, rng: np.random.Generator) -> np.ndarray:
    """SVHN: random palette per image, uneven lighting, blur and sensor noise."""
    n = len(src.fine)
    mask = _svhn_mask(src, size, rng)[..., None]
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


_RENDERERS: dict[str, Callable[[_Source, int, np.random.Generator], np.ndarray]] = {
    "mnist": _mnist,
    "inverse": _inverse,
    "mnistm": _mnistm,
    "usps": _usps,
    "svhn": _svhn,
}
