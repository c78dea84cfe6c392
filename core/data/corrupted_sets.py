"""Load the standard corruption benchmarks from the user's copy: CIFAR-10-C and ImageNet-C.

These are the published test streams for test-time / cloud-edge adaptation (CEMA). The layouts
are the ones the archives unpack to; nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .folders import read_images, require_dir, scan_class_folders
from .types import DatasetError, Split

logger = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3, 4, 5)


def _check_severity(severity: int, where: Path) -> None:
    valid = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
    if not valid or severity not in SEVERITIES:
        raise DatasetError(f"severity {severity!r} for {where} is out of range; expected 1..5")


def _check_name(corruption: str, root: Path) -> None:
    """A corruption is a plain name inside root, never a path that escapes it."""
    if not isinstance(corruption, str) or not corruption or Path(corruption).name != corruption \
            or corruption in (".", ".."):
        raise DatasetError(f"corruption {corruption!r} is not a plain name inside {root}")


def _load_npy(path: Path) -> np.ndarray:
    """Memory-mapped so that only the requested severity block is read from disk."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path} as a .npy array: {exc}") from exc


def load_cifar_c(root: str | Path, corruption: str, severity: int) -> Split:
    """One corruption at one severity from ``root/<corruption>.npy`` + ``root/labels.npy``.

    The image file stacks severities 1..5: shape (5*n, H, W, 3) uint8 (H = W = 32 for
    CIFAR-10/100-C). labels.npy holds either the 5*n stacked labels or the n labels of one block.
    """
    root = Path(root).expanduser()
    require_dir(root, "a CIFAR-C folder holding <corruption>.npy and labels.npy")
    _check_name(corruption, root)
    path = root / f"{corruption}.npy"
    _check_severity(severity, path)
    if not path.is_file():
        available = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
        raise DatasetError(f"{path} does not exist; corruptions found in {root}: {available}")
    data = _load_npy(path)
    if data.ndim != 4 or data.shape[3] != 3 or data.shape[1] != data.shape[2] \
            or data.shape[0] == 0 or data.shape[0] % len(SEVERITIES):
        raise DatasetError(
            f"{path} has shape {data.shape}; expected (5*n, H, H, 3) with severities 1..5 stacked"
        )
    if data.dtype != np.uint8:
        raise DatasetError(f"{path} has dtype {data.dtype}; expected uint8")
    n = data.shape[0] // len(SEVERITIES)
    block = slice((severity - 1) * n, severity * n)
    labels = _cifar_labels(root / "labels.npy", n)[block]
    logger.info("CIFAR-C %s severity %d: %d images from %s", corruption, severity, n, path)
    return Split(images=np.array(data[block]), labels=labels)


def _cifar_labels(path: Path, n: int) -> np.ndarray:
    """The stacked labels (length 5*n), tiled from one block when only n are stored."""
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; expected the labels of the CIFAR-C images")
    labels = _load_npy(path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path} has {labels.dtype} {labels.shape}; expected a 1-D integer array"
        )
    if len(labels) == n:
        labels = np.tile(labels, len(SEVERITIES))
    if len(labels) != n * len(SEVERITIES):
        raise DatasetError(
            f"{path} has {len(labels)} labels; expected {n * len(SEVERITIES)} "
            f"(or {n}) for {n} images per severity"
        )
    if len(labels) and labels.min() < 0:
        raise DatasetError(f"{path} has negative labels")
    return np.asarray(labels, dtype=np.int64)


def load_imagenet_c(
    root: str | Path,
    corruption: str,
    severity: int,
    *,
    image_size: int = 224,
    classes: Sequence[str] | None = None,
    max_per_class: int | None = None,
) -> tuple[Split, tuple[str, ...]]:
    """Images of ``root/<corruption>/<severity>/<wnid>/*.JPEG`` and the class (wnid) order.

    Labels index the returned classes: all wnids sorted (the standard ImageNet order) by
    default, or `classes` in the order given. `max_per_class` keeps the first files (sorted by
    name) of each class, so a subset is reproducible without a seed.
    """
    root = Path(root).expanduser()
    require_dir(root, "an ImageNet-C folder <root>/<corruption>/<severity>/<wnid>/")
    _check_name(corruption, root)
    corruption_dir = root / corruption
    _check_severity(severity, corruption_dir)
    if not corruption_dir.is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetError(
            f"{corruption_dir} is missing; corruptions found in {root}: {available}"
        )
    severity_dir = corruption_dir / str(severity)
    require_dir(severity_dir, f"{corruption_dir}/<1..5>/<wnid>/<images>")
    by_class = scan_class_folders(severity_dir)
    names = tuple(sorted(by_class)) if classes is None else tuple(classes)
    missing = [c for c in names if c not in by_class]
    if not names or missing:
        raise DatasetError(f"class folders {[str(severity_dir / c) for c in missing]} missing "
                           f"(or no classes asked for) in {severity_dir}")
    if max_per_class is not None and (not isinstance(max_per_class, int) or max_per_class < 1):
        raise ValueError(f"max_per_class must be None or a positive integer, got {max_per_class!r}")
    files = [by_class[c][:max_per_class] for c in names]
    labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(f) for f in files])
    paths = [p for group in files for p in group]
    logger.info("ImageNet-C %s severity %d: reading %d images", corruption, severity, len(paths))
    return Split(images=read_images(paths, image_size), labels=labels), names
