"""Glyph masks from the TrueType fonts bundled with matplotlib, rasterised once and cached.

glyph-shift draws characters the way SynthDigits draws digits: from real fonts, offline. The
fonts are the text faces that ship inside matplotlib (``matplotlib.get_data_path()/fonts/ttf``);
nothing is downloaded. Each (font, character) is rasterised once with FreeType (via Pillow) at
a high resolution, cropped to its ink, scaled so its longer side fills a fixed box (aspect
kept) and box-filtered down to ``ATLAS_BOX`` pixels: an "atlas" of size-normalised masks that
every sample of every split reads from. Normalising the size is what makes the benchmark about
*shape* (a sample's size is drawn later); it is also why lower/upper-case pairs that are scaled
copies of each other (o/O, s/S, ...) collide and are dropped from the class sets (see
:func:`confusion` and ``core.data.glyph_shift``).

A font is used for a character only if its character map has the character and the rendered
glyph is neither empty nor the font's "missing glyph" box. The Computer Modern fonts use a TeX
encoding in which many ASCII punctuation slots hold other glyphs (in ``cmr10`` '<' is an
inverted '!'), so they are used for letters and digits only (``cmmi10``, math italic, for
letters only: its digits are old-style figures).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

RASTER_PX = 160  # FreeType size (pixels per em) of the one high-resolution rasterisation
ATLAS_BOX = 56  # longer side of a normalised glyph in the atlas, in atlas pixels
ATLAS_PAD = 4  # empty atlas border, so bilinear reads near the glyph edge see zeros
ATLAS_SIDE = ATLAS_BOX + 2 * ATLAS_PAD

_ALNUM = frozenset(string.ascii_letters + string.digits)
_LETTERS = frozenset(string.ascii_letters)


@dataclass(frozen=True)
class FontFace:
    """One bundled font file and the characters it may draw (None: whatever it maps)."""

    file: str
    only: frozenset[str] | None = None


# The text faces matplotlib ships. Left out: DejaVu*Display (a few dozen glyphs), the STIX
# NonUnicode / Size* fonts (private-use variants and big delimiters), cmex10 / cmsy10 (math
# symbols in ASCII slots) and LastResortHE (a box for every code point).
FONTS: tuple[FontFace, ...] = (
    FontFace("DejaVuSans.ttf"),
    FontFace("DejaVuSans-Bold.ttf"),
    FontFace("DejaVuSans-Oblique.ttf"),
    FontFace("DejaVuSans-BoldOblique.ttf"),
    FontFace("DejaVuSansMono.ttf"),
    FontFace("DejaVuSansMono-Bold.ttf"),
    FontFace("DejaVuSansMono-Oblique.ttf"),
    FontFace("DejaVuSansMono-BoldOblique.ttf"),
    FontFace("DejaVuSerif.ttf"),
    FontFace("DejaVuSerif-Bold.ttf"),
    FontFace("DejaVuSerif-Italic.ttf"),
    FontFace("DejaVuSerif-BoldItalic.ttf"),
    FontFace("STIXGeneral.ttf"),
    FontFace("STIXGeneralBol.ttf"),
    FontFace("STIXGeneralItalic.ttf"),
    FontFace("STIXGeneralBolIta.ttf"),
    FontFace("cmr10.ttf", _ALNUM),
    FontFace("cmb10.ttf", _ALNUM),
    FontFace("cmss10.ttf", _ALNUM),
    FontFace("cmti10.ttf", _ALNUM),
    FontFace("cmtt10.ttf", _ALNUM),
    FontFace("cmmi10.ttf", _LETTERS),
)
FONT_FILES: tuple[str, ...] = tuple(f.file for f in FONTS)


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder (matplotlib is imported only when fonts are needed)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=1)
def fonts_digest() -> str:
    """sha256 over the font files' bytes: a different matplotlib may ship different outlines,
    and on-disk caches of rendered sets must not outlive them."""
    h = hashlib.sha256()
    for face in FONTS:
        h.update(face.file.encode())
        h.update((font_dir() / face.file).read_bytes())
    return h.hexdigest()


@functools.cache
def _face(index: int):  # -> (PIL FreeTypeFont, charmap set, notdef mask)
    from matplotlib.ft2font import FT2Font
    from PIL import ImageFont

    path = font_dir() / FONTS[index].file
    if not path.is_file():
        raise FileNotFoundError(f"bundled font {path} is missing; is matplotlib installed fully?")
    charmap = frozenset(FT2Font(str(path)).get_charmap())
    font = ImageFont.truetype(str(path), RASTER_PX)
    unmapped = next(c for c in range(0xE000, 0xF900) if c not in charmap)  # private use area
    return font, charmap, _rasterise(font, chr(unmapped))


def _rasterise(font, char: str) -> np.ndarray:
    """The glyph's ink as float32 in [0, 1], cropped to its bounding box (may be empty)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(char)
    if right <= left or bottom <= top:
        return np.zeros((0, 0), np.float32)
    canvas = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(canvas).text((-left, -top), char, font=font, fill=255)
    ink = np.asarray(canvas, dtype=np.float32) / 255.0
    rows, cols = np.flatnonzero(ink.max(axis=1) > 0), np.flatnonzero(ink.max(axis=0) > 0)
    if not len(rows):
        return np.zeros((0, 0), np.float32)
    return ink[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]


def _normalise(ink: np.ndarray, box: int, pad: int) -> np.ndarray:
    """Scale the cropped ink so its longer side is `box` pixels (box filter, aspect kept) and
    centre it on a (box + 2 pad)^2 canvas."""
    from PIL import Image

    h, w = ink.shape
    scale = box / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(ink, mode="F").resize((nw, nh), Image.Resampling.BOX))
    side = box + 2 * pad
    out = np.zeros((side, side), np.float32)
    top, left = (side - nh) // 2, (side - nw) // 2
    out[top: top + nh, left: left + nw] = np.clip(small, 0.0, 1.0)
    return out


@functools.cache
def glyph(font: int, char: str, box: int = ATLAS_BOX, pad: int = ATLAS_PAD) -> np.ndarray | None:
    """The normalised mask of `char` in font `font` (index into FONTS), or None where the font
    lacks it. Cached: each (font, char) is rasterised once per process. Read-only."""
    if len(char) != 1:
        raise ValueError(f"a glyph is one character, got {char!r}")
    face = FONTS[font]
    if face.only is not None and char not in face.only:
        return None
    pil_font, charmap, notdef = _face(font)
    if ord(char) not in charmap:
        return None
    ink = _rasterise(pil_font, char)
    if ink.size == 0 or (ink.shape == notdef.shape and np.array_equal(ink, notdef)):
        return None
    out = _normalise(ink, box, pad)
    out.flags.writeable = False
    return out


def fonts_for(char: str) -> tuple[int, ...]:
    """Indices of the fonts that draw `char`."""
    return tuple(i for i in range(len(FONTS)) if glyph(i, char) is not None)


@dataclass(frozen=True)
class Atlas:
    """Every (font, char) mask of a class list stacked for vectorised reads.

    masks: (G, ATLAS_SIDE, ATLAS_SIDE) float32; for class c its glyphs are
    ``masks[start[c]: start[c] + count[c]]`` and ``font_of[g]`` is glyph g's index into FONTS.
    """

    classes: tuple[str, ...]
    masks: np.ndarray
    start: np.ndarray
    count: np.ndarray
    font_of: np.ndarray


@functools.lru_cache(maxsize=8)
def atlas(classes: tuple[str, ...]) -> Atlas:
    """The atlas of `classes`, built once per process; refuses a class fewer than 2 fonts draw."""
    masks: list[np.ndarray] = []
    start, count, font_of = [], [], []
    for char in classes:
        ids = fonts_for(char)
        if len(ids) < 2:
            raise ValueError(f"class {char!r} is drawn by {len(ids)} bundled font(s); need >= 2")
        start.append(len(masks))
        count.append(len(ids))
        masks += [glyph(i, char) for i in ids]
        font_of += ids
    out = Atlas(classes, np.stack(masks), np.array(start), np.array(count), np.array(font_of))
    for arr in (out.masks, out.start, out.count, out.font_of):
        arr.flags.writeable = False
    logger.info("glyph atlas: %d classes, %d (font, char) masks", len(classes), len(masks))
    return out


# --------------------------------------------------------------------------- distinctness


def _cross_font_distances(chars: Sequence[str], side: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 distances between every (font, char) glyph normalised to a `side`^2 box, with
    same-font pairs set to inf; and each glyph's class index."""
    pad = 1
    vecs, cls, fnt = [], [], []
    for c_idx, char in enumerate(chars):
        for f in fonts_for(char):
            vecs.append(glyph(f, char, side - 2 * pad, pad).ravel())
            cls.append(c_idx)
            fnt.append(f)
    x = np.asarray(vecs, dtype=np.float64)
    fnt_a = np.asarray(fnt)
    sq = (x * x).sum(axis=1)
    dist = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    dist[fnt_a[:, None] == fnt_a[None, :]] = np.inf  # no help from the same font
    return dist, np.asarray(cls)


def _confusion_from(dist: np.ndarray, cls: np.ndarray, n: int, alive: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(alive[cls])
    sub = dist[np.ix_(rows, rows)]
    nearest = cls[rows][np.argmin(sub, axis=1)]
    out = np.zeros((n, n))
    np.add.at(out, (cls[rows], nearest), 1.0)
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1.0)


def confusion(chars: Sequence[str], side: int = 16) -> np.ndarray:
    """How often a font's glyph of one character looks most like another character.

    Every (font, char) is normalised to a `side`^2 box (16: about what a 32 px sample shows)
    and matched to its nearest neighbour (L2) among the glyphs of the *other* fonts
    (leave-one-font-out: a character only counts as distinct if it is recognisable across
    fonts). Entry [a, b] is the fraction of a's fonts whose nearest neighbour is a glyph of b;
    the diagonal is cross-font recognisability. Scaled copies (o/O) and homoglyphs (Latin A,
    Greek Alpha) match each other about as often as themselves.
    """
    chars = tuple(chars)
    dist, cls = _cross_font_distances(chars, side)
    return _confusion_from(dist, cls, len(chars), np.ones(len(chars), bool))


def select_distinct(candidates: Sequence[str], size: int, max_confusion: float = 0.2,
                    min_fonts: int = 4, side: int = 16, fixed: int = 0) -> tuple[str, ...]:
    """Greedy cut of `candidates` (highest priority first) to at most `size` characters that
    are told apart: the rule the built-in class sets were chosen by.

    Characters drawn by fewer than `min_fonts` fonts go first. Then, while more than `size`
    remain, or some pair (a, b) confuses (a->b plus b->a, see :func:`confusion`) above
    `max_confusion`, or some character is recognised across fonts in under half of its fonts,
    the lower-priority character of the most confused pair (or the weakest character) is
    dropped and the confusion re-measured. The first `fixed` candidates are never dropped
    (only pairs with another character count against them), so a larger set can extend a
    smaller one.
    """
    keep = [c for c in dict.fromkeys(candidates) if len(fonts_for(c)) >= min_fonts]
    if keep[:fixed] != list(candidates[:fixed]):
        raise ValueError("the fixed candidates must be distinct and drawn by enough fonts")
    dist, cls = _cross_font_distances(keep, side)
    alive = np.ones(len(keep), bool)
    free = np.arange(len(keep)) >= fixed
    while True:
        conf = _confusion_from(dist, cls, len(keep), alive)
        pair = conf + conf.T
        np.fill_diagonal(pair, 0.0)
        pair[~free[:, None] & ~free[None, :]] = 0.0  # fixed pairs are taken as they are
        a, b = np.unravel_index(np.argmax(pair), pair.shape)
        weak = np.flatnonzero(alive & free & (np.diag(conf) < 0.5))
        if pair[a, b] <= max_confusion and not len(weak) and alive.sum() <= size:
            return tuple(c for c, on in zip(keep, alive) if on)
        if pair[a, b] > max_confusion:
            drop = int(max(a, b))
        elif len(weak):
            drop = int(weak[-1])
        else:  # only too many left: the most confused pair again, else the lowest priority
            drop = int(max(a, b)) if pair[a, b] > 0 else int(np.flatnonzero(alive & free)[-1])
        logger.debug("dropping %r (pair %r/%r confusion %.2f)", keep[drop], keep[a], keep[b],
                     pair[a, b])
        alive[drop] = False
