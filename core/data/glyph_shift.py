"""`glyph-shift`: a built-in feature-shift benchmark of font glyphs, as large as asked.

The idea of SynthDigits (Digits-5): characters drawn from real fonts, here the TrueType faces
bundled with matplotlib (``core.data.glyphs.FONTS``; nothing is downloaded). Each sample picks
one of the fonts that draw its class, reads the size-normalised glyph mask from an in-memory
atlas (each (font, char) rasterised once per process) and varies it: size, aspect, position,
rotation, shear, a smooth elastic displacement and stroke weight, all drawn from explicit seeded
generators and applied to the whole batch at once. The varied masks are then drawn in client
k's domain style by the *same* renderers as digits-shift (``core.data.domains.render_ink``:
mnist, inverse, mnistm, usps, svhn), so each client is one domain with the same label set.

Class sets (``GLYPH_CLASSES``; ``glyph_classes(n)``), nested 10 < 47 < 100:

* 10: the digits ``0123456789``.
* 47: the digits, the capitals but I, O, S, and ``abdefikmnpqrty``
  (``0123456789ABCDEFGHJKLMNPQRTUVWXYZabdefikmnpqrty``).
* 100: the 47, then ``!#$%&*+/<=>?@\\~``, Greek ``ΞΣΦΨαβεζλνξς``, Cyrillic ``ДЖЙЩЪЮф``
  and ``§¶∞÷×±√∂∈≠≤≥©®¿ðæøå``.

They were chosen by measurement, not by hand (:func:`select_class_sets` re-runs it with
:func:`core.data.glyphs.select_distinct`): every (font, char) is normalised to a 16 px box
(about what a 32 px sample shows) and matched to its nearest glyph among the *other* fonts.
Repeatedly, of the most confused pair (o/O/0, l/I/1, s/S, Latin A / Greek Alpha, ...) the
character of lower priority is dropped (priority: digits, capitals, lower case, punctuation,
Greek, Cyrillic, symbols) and the confusion re-measured, until no pair confuses in more than
20% of the fonts, every class is recognised across fonts in at least half of its fonts, and
the set is down to its size (the larger set keeps the smaller one whole; the last cuts are
the still most confused pairs, so e.g. arrows and card suits fell for size, not confusion).
Tiny marks whose identity is their size or height (. , ' " ` : ; - _ |) are not candidates:
size normalisation erases exactly that; nor are characters fewer than 6 fonts draw. Every
class of the 47 is drawn by 21 or 22 of the 22 fonts; the others by 16 (Greek, Cyrillic, most
symbols: the DejaVu and STIX faces) or 14.

Splits: each client's train / val / test are independent draws (own rng streams) of
label-balanced samples (per-class counts within one); "disjoint" means different random draws
of (font, variation, style): fonts are shared by the splits, no image is repeated between them
(tested byte for byte). The result is byte-identical for the same arguments and cached on disk
(an .npz keyed by every argument and the font files' bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from scipy import ndimage

from .cache import atomic_write, cache_dir, file_lock
from .domains import DOMAINS, check_domains, render_ink
from .glyphs import (
    ATLAS_BOX,
    ATLAS_SIDE,
    FONT_FILES,
    Atlas,
    atlas,
    fonts_digest,
    select_distinct,
)
from .partition import seeded_rng
from .types import ClientData, FederatedDataset, Split

logger = logging.getLogger(__name__)

NAME = "glyph-shift"
FORMAT = 1  # bump whenever the rendering changes, so on-disk caches of older sets are not read
FINE = 64  # side of the varied ink mask the domain styles read (the output is downsampled)
CHUNK = 512  # images per style call; fixed, since each chunk has its own style rng stream
SPLITS = ("train", "val", "test")

_DIGITS = "0123456789"
_ASCII_47 = _DIGITS + "ABCDEFGHJKLMNPQRTUVWXYZ" + "abdefikmnpqrty"
_EXTRA_53 = ("!#$%&*+/<=>?@\\~" + "ΞΣΦΨαβεζλνξς" + "ДЖЙЩЪЮф" + "§¶∞÷×±√∂∈≠≤≥©®¿ðæøå")

GLYPH_CLASSES: Mapping[int, tuple[str, ...]] = MappingProxyType({
    10: tuple(_DIGITS),
    47: tuple(_ASCII_47),
    100: tuple(_ASCII_47 + _EXTRA_53),
})

# The candidates the class sets were measured from, in priority order: select_class_sets()
# reproduces GLYPH_CLASSES from them (a slow test checks it; a fast one checks the rule holds).
_SELECTION: Mapping[str, str] = MappingProxyType({
    "latin": _DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz",
    "punctuation": "!#$%&()*+/<=>?@[\\]^{}~",
    "greek": "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ" + "αβγδεζηθικλμνξοπρςστυφχψω",
    "cyrillic": ("АБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"
                 "абвгдежзийклмнопрстуфхцчшщъыьэюя"),
    "symbols": "§¶∑∞÷×±√∫∂∇∈∩∪≈≠≤≥€£¥©®°µ¿¡ßþðæœøå∀∃¬⊂⊃⊕⊗†‡•♠♣♥♦★→←↑↓↔⇒",
})
SELECTION_RULE: Mapping[str, float] = MappingProxyType(
    {"max_confusion": 0.2, "min_fonts": 6, "side": 16})


def glyph_classes(n: int) -> tuple[str, ...]:
    """The built-in class set of `n` classes (10, 47 or 100)."""
    if n not in GLYPH_CLASSES:
        raise ValueError(f"glyph-shift has class sets of {sorted(GLYPH_CLASSES)}, not {n!r}")
    return GLYPH_CLASSES[n]


def select_class_sets() -> dict[int, tuple[str, ...]]:
    """Re-run the measurement that chose ``GLYPH_CLASSES`` (a few seconds): each set extends
    the smaller one with the candidates that survive :func:`select_distinct`'s rule."""
    rule = dict(SELECTION_RULE)
    rule["min_fonts"] = int(rule["min_fonts"])
    rule["side"] = int(rule["side"])
    latin = _SELECTION["latin"]
    sets = {10: select_distinct(_DIGITS, 10, **rule)}
    sets[47] = select_distinct(latin, 47, fixed=10, **rule)
    rest = "".join(c for c in latin if c not in sets[47])
    more = rest + "".join(_SELECTION[k] for k in ("punctuation", "greek", "cyrillic", "symbols"))
    sets[100] = select_distinct("".join(sets[47]) + more, 100, fixed=47, **rule)
    return sets


@dataclass(frozen=True)
class Variation:
    """Ranges of the per-sample variation (uniform unless noted); lengths are fractions of the
    character box, so they mean the same at every resolution."""

    scale: tuple[float, float] = (0.68, 0.95)  # longer glyph side / box side
    aspect: float = 0.12  # log aspect ratio (height / width) in +-aspect
    rotation_deg: float = 12.0  # +-
    shear: float = 0.22  # +- horizontal shear (x += shear * y)
    shift: float = 0.07  # +- translation of the glyph centre
    elastic: float = 0.018  # std of the smooth random displacement
    elastic_grid: int = 4  # control points per side of the displacement field
    stroke_blur: float = 0.022  # blur sigma before re-thresholding the strokes
    stroke: tuple[float, float] = (1.1, 3.0)  # ink gain after the blur: < 1.5 thin, > 2 bold


VARIATION = Variation()


@dataclass(frozen=True)
class GlyphShift:
    """A built glyph-shift set with what made each sample: font_ids[k][split] (N,) indexes
    `fonts` for client k's split (the benchmark's own checks use it; training does not)."""

    dataset: FederatedDataset
    fonts: tuple[str, ...]
    font_ids: tuple[Mapping[str, np.ndarray], ...]


# --------------------------------------------------------------------------- public entry


def make_glyph_shift(
    seed: int = 0,
    classes: int | Sequence[str] = 10,
    image_size: int = 32,
    clients_per_domain: int = 1,
    train_per_client: int = 2000,
    val_per_client: int = 250,
    test_per_client: int = 1000,
    domains: Sequence[str] = DOMAINS,
    cache: str | os.PathLike | bool | None = None,
) -> FederatedDataset:
    """Build (or load from the cache) the glyph feature-shift benchmark.

    Client k lives in domain ``domains[k // clients_per_domain]`` and gets label-balanced
    train / val / test splits of the given sizes. `classes` is a built-in set size (10, 47,
    100) or a tuple of characters. `cache`: None or True = the default cache folder
    (``$FEDSHIFT_CACHE`` or ~/.cache/fedshift), a path = that folder, False = no disk cache.
    Same arguments give byte-identical arrays, cached or not; a first build of 10,000 images
    takes a few seconds (benchmarks/glyph_shift_build.py), a cached one loads in milliseconds.
    """
    return build_glyph_shift(seed, classes, image_size, clients_per_domain, train_per_client,
                             val_per_client, test_per_client, domains, cache).dataset


def build_glyph_shift(
    seed: int = 0,
    classes: int | Sequence[str] = 10,
    image_size: int = 32,
    clients_per_domain: int = 1,
    train_per_client: int = 2000,
    val_per_client: int = 250,
    test_per_client: int = 1000,
    domains: Sequence[str] = DOMAINS,
    cache: str | os.PathLike | bool | None = None,
) -> GlyphShift:
    """:func:`make_glyph_shift`, also returning each sample's font."""
    params = _Params.checked(seed, classes, image_size, clients_per_domain, train_per_client,
                             val_per_client, test_per_client, domains)
    if cache is False:
        return _build(params)
    if cache is True:
        cache = None
    path = cache_dir(cache) / NAME / f"{NAME}-{params.key()}.npz"
    with file_lock(path.with_name(f".{path.name}.lock")):
        if path.is_file():
            try:
                return _load(path, params)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                logger.warning("ignoring unreadable cache %s (%s); rebuilding", path, err)
        built = _build(params)
        atomic_write(path, lambda tmp: _save(tmp, built, params), suffix=".npz")
        logger.info("%s cached at %s", NAME, path)
        return built


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class _Params:
    seed: int
    classes: tuple[str, ...]
    image_size: int
    clients_per_domain: int
    sizes: tuple[int, int, int]  # train, val, test per client
    domains: tuple[str, ...]

    @classmethod
    def checked(cls, seed: int, classes: int | Sequence[str], image_size: int,
                clients_per_domain: int, train: int, val: int, test: int,
                domains: Sequence[str]) -> _Params:
        """Refuse bad arguments with a message that names them."""
        def is_int(x: object) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if is_int(classes):
            names = glyph_classes(int(classes))
        elif isinstance(classes, str) or not isinstance(classes, Sequence):
            raise ValueError(f"classes must be 10, 47, 100 or a tuple of characters (a string "
                             f"is refused: is '10' ten classes or two?), got {classes!r}")
        else:
            names = tuple(classes)
            if len(names) < 2 or len(set(names)) != len(names) or \
                    any(not isinstance(c, str) or len(c) != 1 for c in names):
                raise ValueError(f"classes must be >= 2 distinct single characters, got {names!r}")
        if not is_int(image_size) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        if not is_int(clients_per_domain) or clients_per_domain < 1:
            raise ValueError(
                f"clients_per_domain must be a positive integer, got {clients_per_domain!r}")
        for name, n in (("train_per_client", train), ("val_per_client", val),
                        ("test_per_client", test)):
            if not is_int(n) or n < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
        if train < 1:
            raise ValueError(f"train_per_client must be positive, got {train}")
        doms = check_domains(domains)
        return cls(int(seed), names, int(image_size), int(clients_per_domain),
                   (int(train), int(val), int(test)), doms)

    def key(self) -> str:
        """Hash of everything the arrays depend on, the font files included."""
        blob = json.dumps({"format": FORMAT, "fine": FINE, "chunk": CHUNK, **asdict(self),
                           "variation": asdict(VARIATION), "fonts": fonts_digest()},
                          sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def n_clients(self) -> int:
        return len(self.domains) * self.clients_per_domain


# --------------------------------------------------------------------------- building


def _build(params: _Params) -> GlyphShift:
    start = time.perf_counter()
    glyphs = atlas(params.classes)
    clients, font_ids = [], []
    for k in range(params.n_clients):
        domain = params.domains[k // params.clients_per_domain]
        splits, fonts = {}, {}
        for split, n in zip(SPLITS, params.sizes):
            images, labels, glyph_idx = _render_split(glyphs, params, k, split, n, domain)
            splits[split] = Split(images=images, labels=labels)
            fonts[split] = glyphs.font_of[glyph_idx].astype(np.int16)
        clients.append(ClientData(client_id=k, domain=domain, **splits))
        font_ids.append(MappingProxyType(fonts))
    dataset = FederatedDataset(name=NAME, classes=params.classes, domains=params.domains,
                               clients=tuple(clients), image_size=params.image_size)
    seconds = time.perf_counter() - start
    total = params.n_clients * sum(params.sizes)
    logger.info("%s: %d classes, %d clients over %s, %dx%d, %s per client: %d images in "
                "%.1f s", NAME, len(params.classes), params.n_clients, ",".join(params.domains),
                params.image_size, params.image_size, params.sizes, total, seconds)
    return GlyphShift(dataset=dataset, fonts=FONT_FILES, font_ids=tuple(font_ids))


def _render_split(glyphs: Atlas, params: _Params, client: int, split: str, n: int,
                  domain: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, glyph choices and variation for one split from its own rng stream; masks and
    styles per fixed-size chunk (each chunk its own style stream), so memory stays bounded
    and the result does not depend on how the work is cut."""
    rng = seeded_rng(params.seed, NAME, "draw", client, split)
    n_classes = len(params.classes)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % n_classes)
    pick = np.floor(rng.random(n) * glyphs.count[labels]).astype(np.int64)
    glyph_idx = glyphs.start[labels] + pick
    variation = _draw_variation(n, rng)
    images = np.empty((n, params.image_size, params.image_size, 3), np.uint8)
    for c, lo in enumerate(range(0, n, CHUNK)):
        hi = min(n, lo + CHUNK)
        fine = _varied_masks(glyphs.masks, glyph_idx[lo:hi], {k: v[lo:hi] for k, v in variation.items()})
        style_rng = seeded_rng(params.seed, NAME, "style", client, split, c)
        images[lo:hi] = render_ink(fine, domain, params.image_size, style_rng)
    return images, labels, glyph_idx


def _draw_variation(n: int, rng: np.random.Generator, v: Variation = VARIATION) -> dict[str, np.ndarray]:
    """Every per-sample random number of the geometry and strokes, drawn up front."""
    g = v.elastic_grid
    return {
        "scale": rng.uniform(*v.scale, n),
        "aspect": np.exp(rng.uniform(-v.aspect, v.aspect, n)),
        "angle": np.deg2rad(rng.uniform(-v.rotation_deg, v.rotation_deg, n)),
        "shear": rng.uniform(-v.shear, v.shear, n),
        "shift": rng.uniform(-v.shift, v.shift, (n, 2)),
        "elastic": rng.normal(0.0, v.elastic, (n, 2, g, g)),
        "stroke": rng.uniform(*v.stroke, n),
    }


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights that stretch n_in control points over n_out samples (edges clamp)."""
    pos = np.clip((np.arange(n_out) + 0.5) / n_out * (n_in - 1), 0, n_in - 1)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), lo] = 1.0 - (pos - lo)
    w[np.arange(n_out), lo + 1] = pos - lo
    return w


def _varied_masks(masks: np.ndarray, glyph_idx: np.ndarray, var: Mapping[str, np.ndarray],
                  v: Variation = VARIATION) -> np.ndarray:
    """(n, FINE, FINE) float32 masks: each glyph warped by its affine + elastic map, blurred and
    re-thresholded to its stroke weight. One map_coordinates call for the whole chunk."""
    u = (np.arange(FINE) + 0.5) / FINE - 0.5  # output pixel centres in box units (-0.5..0.5)
    # output point (row y, col x) -> displaced point -> glyph coordinates q (inverse affine)
    up = _bilinear_matrix(FINE, v.elastic_grid)
    disp = np.einsum("sy,nkyx,tx->knst", up, var["elastic"], up, optimize=True)
    y = u[None, :, None] + disp[0] - var["shift"][:, 0, None, None]
    x = u[None, None, :] + disp[1] - var["shift"][:, 1, None, None]
    cos, sin = np.cos(var["angle"])[:, None, None], np.sin(var["angle"])[:, None, None]
    yr, xr = cos * y + sin * x, -sin * y + cos * x  # undo the rotation
    xr = xr - var["shear"][:, None, None] * yr  # undo the shear
    root = np.sqrt(var["aspect"])[:, None, None]
    s = var["scale"][:, None, None]
    qy, qx = yr / (s * root), xr * root / s  # undo the scale and aspect
    centre = ATLAS_SIDE / 2 - 0.5
    coords = np.stack([np.broadcast_to(glyph_idx[:, None, None].astype(np.float32), qy.shape),
                       (centre + qy * ATLAS_BOX).astype(np.float32),
                       (centre + qx * ATLAS_BOX).astype(np.float32)])
    warped = ndimage.map_coordinates(masks, coords, order=1, mode="constant", cval=0.0,
                                     prefilter=False, output=np.float32)
    blurred = ndimage.gaussian_filter(warped, (0, v.stroke_blur * FINE, v.stroke_blur * FINE),
                                      mode="constant", truncate=3.0)
    return np.clip(blurred * var["stroke"][:, None, None].astype(np.float32), 0.0, 1.0)


# --------------------------------------------------------------------------- disk cache


def _save(path: Path, built: GlyphShift, params: _Params) -> None:
    arrays: dict[str, np.ndarray] = {"key": np.array(params.key())}
    for client, fonts in zip(built.dataset.clients, built.font_ids):
        for split, data in client.splits().items():
            arrays[f"c{client.client_id}_{split}_images"] = data.images
            arrays[f"c{client.client_id}_{split}_labels"] = data.labels
            arrays[f"c{client.client_id}_{split}_fonts"] = fonts[split]
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _load(path: Path, params: _Params) -> GlyphShift:
    with np.load(path, allow_pickle=False) as npz:
        if str(npz["key"]) != params.key():
            raise ValueError("cache key mismatch")
        clients, font_ids = [], []
        for k in range(params.n_clients):
            splits = {s: Split(images=npz[f"c{k}_{s}_images"], labels=npz[f"c{k}_{s}_labels"])
                      for s in SPLITS}
            clients.append(ClientData(client_id=k, domain=params.domains[k // params.clients_per_domain],
                                      **splits))
            font_ids.append(MappingProxyType({s: npz[f"c{k}_{s}_fonts"] for s in SPLITS}))
    if any(tuple(len(c.splits()[s]) for s in SPLITS) != params.sizes for c in clients):
        raise ValueError("cached split sizes differ")
    dataset = FederatedDataset(name=NAME, classes=params.classes, domains=params.domains,
                               clients=tuple(clients), image_size=params.image_size)
    logger.info("%s loaded from %s", NAME, path)
    return GlyphShift(dataset=dataset, fonts=FONT_FILES, font_ids=tuple(font_ids))
