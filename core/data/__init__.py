"""Datasets for feature-shift federated learning and shifted edge streams.

`make_digits_shift` and `make_glyph_shift` build the offline built-in benchmarks;
`load_domain_folders`, `load_cifar_c` and `load_imagenet_c` read real benchmarks from the
user's folders. Everything returns the frozen types below, validated on construction.
"""

from .corrupted_sets import load_cifar_c, load_imagenet_c
from .digits_shift import make_digits_shift
from .domains import DOMAINS, render, render_ink
from .folders import IMAGE_EXTENSIONS, load_domain_folders
from .glyph_shift import (
    GLYPH_CLASSES,
    GlyphShift,
    build_glyph_shift,
    glyph_classes,
    make_glyph_shift,
)
from .partition import (
    seeded_rng,
    stratified_partition,
    stratified_split,
    stratified_subsample,
)
from .preview import save_corruption_preview, save_preview
from .types import ClientData, DatasetError, FederatedDataset, Split

__all__ = [
    "DOMAINS",
    "GLYPH_CLASSES",
    "IMAGE_EXTENSIONS",
    "ClientData",
    "DatasetError",
    "FederatedDataset",
    "GlyphShift",
    "Split",
    "build_glyph_shift",
    "glyph_classes",
    "load_cifar_c",
    "load_domain_folders",
    "load_imagenet_c",
    "make_digits_shift",
    "make_glyph_shift",
    "render",
    "render_ink",
    "save_corruption_preview",
    "save_preview",
    "seeded_rng",
    "stratified_partition",
    "stratified_split",
    "stratified_subsample",
]
