"""Load a real multi-domain benchmark from the user's own folders (nothing is downloaded).

Three layouts are recognised, per domain:

- class folders        ``root/<domain>/<class>/<images>``  (PACS, Office-Caltech10, DomainNet
                       without split files, ImageFolder trees); split into train/val/test here;
- train/test folders   ``root/<domain>/{train,test}/<class>/<images>`` (Digits-5 style; an
                       optional ``val`` folder is used as is, otherwise val is carved from train);
- split files          ``root/<domain>_train.txt`` and ``root/<domain>_test.txt`` with lines
                       ``<path relative to root> <integer label>`` (DomainNet).

Every domain becomes one client. Class names must agree across domains; labels are indices into
the sorted class names (the ImageFolder / DomainNet convention).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .partition import (
    seeded_rng,
    stratified_split,
    stratified_subsample,
    train_val_test_fractions,
)
from .types import ClientData, DatasetError, FederatedDataset, Split

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
_SPLIT_FOLDERS = frozenset({"train", "val", "test"})


@dataclass(frozen=True)
class _Listing:
    """Image files of one domain before reading: parallel paths / class names / origin split."""

    paths: tuple[Path, ...]
    classes: tuple[str, ...]
    origins: tuple[str, ...]  # "all" (class folders) or "train" / "val" / "test"


# --------------------------------------------------------------------------- images


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB; an unreadable file is an error, never skipped."""
    try:
        with Image.open(path) as img:
            img.draft(None, (size, size))  # JPEG: decode at a reduced scale when shrinking
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image file {path}: {exc}") from exc


def read_images(paths: Sequence[Path], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8, read one file at a time into one preallocated array."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = read_image(path, size)
    return out


# --------------------------------------------------------------------------- listing


def _visible_children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def require_dir(path: Path, expected: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{path} is missing or not a directory; expected {expected}")


def scan_class_folders(folder: Path) -> dict[str, list[Path]]:
    """{class name: sorted image files (recursive)} for ``folder/<class>/...``.

    A class folder without any image file is an error: an empty class would silently change
    the label set.
    """
    require_dir(folder, "a folder with one sub-folder per class")
    class_dirs = [p for p in _visible_children(folder) if p.is_dir()]
    if not class_dirs:
        raise DatasetError(f"{folder} has no class sub-folders; expected {folder}/<class>/<images>")
    found: dict[str, list[Path]] = {}
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = [p for p in files if is_image_file(p) and not p.name.startswith(".")]
        if not images:
            raise DatasetError(
                f"class folder {class_dir} contains no image files "
                f"(expected {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        if len(images) < len(files):
            logger.debug("%s: skipped %d non-image files", class_dir, len(files) - len(images))
        found[class_dir.name] = images
    return found


def _listing_from_folders(by_origin: dict[str, dict[str, list[Path]]]) -> _Listing:
    paths, classes, origins = [], [], []
    for origin, by_class in by_origin.items():
        for name, files in by_class.items():
            paths += files
            classes += [name] * len(files)
            origins += [origin] * len(files)
    return _Listing(tuple(paths), tuple(classes), tuple(origins))


def _list_folder_domain(domain_dir: Path) -> _Listing:
    """Class folders, or train/test(/val) folders each holding class folders."""
    require_dir(domain_dir, "a domain folder")
    subdirs = {p.name for p in _visible_children(domain_dir) if p.is_dir()}
    if {"train", "test"} <= subdirs and subdirs <= _SPLIT_FOLDERS:
        by_origin = {o: scan_class_folders(domain_dir / o) for o in sorted(subdirs)}
        reference = set(by_origin["train"])
        for origin, by_class in by_origin.items():
            _check_same_classes(reference, set(by_class), f"{domain_dir / origin}",
                                f"{domain_dir / 'train'}")
        return _listing_from_folders(by_origin)
    return _listing_from_folders({"all": scan_class_folders(domain_dir)})


def _parse_split_file(root: Path, split_file: Path, label_of: dict[str, int]) -> _Listing:
    """Lines ``relative/path label``; the class name is the file's parent folder name, and one
    class name must always carry the same integer label (checked across files via label_of)."""
    if not split_file.is_file():
        raise DatasetError(f"split file {split_file} is missing; expected lines '<path> <label>'")
    paths, classes = [], []
    for lineno, line in enumerate(split_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{split_file}:{lineno}"
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetError(f"{where}: expected '<relative/path> <integer label>', got {line!r}")
        rel, label = Path(parts[0]), int(parts[1])
        if len(rel.parts) < 2:
            raise DatasetError(f"{where}: expected a path '<domain>/<class>/<file>', got {rel}")
        name = rel.parent.name
        if label_of.setdefault(name, label) != label:
            raise DatasetError(
                f"{where}: class {name!r} has label {label}, but {label_of[name]} elsewhere"
            )
        path = root / rel
        if not path.is_file():
            raise DatasetError(f"{where}: image file {path} does not exist")
        paths.append(path)
        classes.append(name)
    if not paths:
        raise DatasetError(f"split file {split_file} lists no images")
    origin = "train" if split_file.name.endswith("_train.txt") else "test"
    return _Listing(tuple(paths), tuple(classes), (origin,) * len(paths))


def _list_split_file_domain(root: Path, domain: str, label_of: dict[str, int]) -> _Listing:
    train = _parse_split_file(root, root / f"{domain}_train.txt", label_of)
    test = _parse_split_file(root, root / f"{domain}_test.txt", label_of)
    _check_same_classes(set(train.classes), set(test.classes),
                        str(root / f"{domain}_test.txt"), str(root / f"{domain}_train.txt"))
    return _Listing(train.paths + test.paths, train.classes + test.classes,
                    train.origins + test.origins)


def _check_same_classes(expected: set[str], got: set[str], where: str, reference: str) -> None:
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise DatasetError(
            f"{where} has different classes from {reference}: missing {missing}, extra {extra}; "
            f"every domain and split must have the same class folders"
        )


def discover_domains(root: Path) -> dict[str, str]:
    """{domain: layout} for every domain under root; layout is 'split-files' or 'folders'."""
    require_dir(root, "<root>/<domain>/... folders or <root>/<domain>_train.txt split files")
    layouts = {p.name: "folders" for p in _visible_children(root) if p.is_dir()}
    for train_file in sorted(root.glob("*_train.txt")):
        domain = train_file.name[: -len("_train.txt")]
        if not (root / f"{domain}_test.txt").is_file():
            raise DatasetError(
                f"{train_file} has no matching {root / f'{domain}_test.txt'}; "
                f"split files come in train/test pairs"
            )
        layouts[domain] = "split-files"
    if not layouts:
        raise DatasetError(
            f"{root} contains no domains; expected <root>/<domain>/<class>/<images>, "
            f"<root>/<domain>/{{train,test}}/<class>/<images> or <root>/<domain>_train.txt"
        )
    return dict(sorted(layouts.items()))


# --------------------------------------------------------------------------- dataset


def load_domain_folders(
    root: str | Path,
    image_size: int = 32,
    *,
    domains: Sequence[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    max_per_domain: int | None = None,
) -> FederatedDataset:
    """A FederatedDataset with one client per domain folder of `root`.

    Class-folder domains are split per class into train/val/test with the given fractions.
    Domains with their own test split (train/test folders, split files) keep it as the test
    split and carve val_fraction of their training images as val (test_fraction is unused).
    `max_per_domain` keeps a stratified subset before any image is read. Images are converted
    to RGB and resized (bilinear, aspect ratio not kept) to image_size x image_size.
    """
    root = Path(root).expanduser()
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    fractions = train_val_test_fractions(val_fraction, test_fraction)
    listings = _list_domains(root, domains)
    classes = tuple(sorted(set(next(iter(listings.values())).classes)))
    clients = tuple(
        _load_client(k, domain, listing, classes, image_size, fractions, seed, max_per_domain)
        for k, (domain, listing) in enumerate(listings.items())
    )
    return FederatedDataset(
        name=root.resolve().name or str(root),
        classes=classes,
        domains=tuple(listings),
        clients=clients,
        image_size=image_size,
    )


def _list_domains(root: Path, domains: Sequence[str] | None) -> dict[str, _Listing]:
    """Listings of the chosen domains, checked to share one set of class names."""
    layouts = discover_domains(root)
    if isinstance(domains, str):
        raise ValueError(f"domains must be a sequence of names, got the string {domains!r}")
    chosen = list(layouts) if domains is None else list(domains)
    for domain in chosen:
        if domain not in layouts:
            raise DatasetError(
                f"domain {domain!r} not found: expected a folder {root / domain} or split files "
                f"{root / f'{domain}_train.txt'}; found domains {list(layouts)}"
            )
    label_of: dict[str, int] = {}
    listings = {
        d: (_list_split_file_domain(root, d, label_of) if layouts[d] == "split-files"
            else _list_folder_domain(root / d))
        for d in chosen
    }
    first = chosen[0]
    for domain in chosen[1:]:
        _check_same_classes(set(listings[first].classes), set(listings[domain].classes),
                            f"domain {domain!r} ({root / domain})",
                            f"domain {first!r} ({root / first})")
    return listings


def _load_client(
    client_id: int,
    domain: str,
    listing: _Listing,
    classes: tuple[str, ...],
    image_size: int,
    fractions: tuple[float, ...],
    seed: int,
    max_per_domain: int | None,
) -> ClientData:
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[c] for c in listing.classes], dtype=np.int64)
    origins = np.array(listing.origins)
    keep = np.arange(len(labels))
    if max_per_domain is not None:
        origin_codes = np.unique(origins, return_inverse=True)[1]
        keep = stratified_subsample(origin_codes * len(classes) + labels, max_per_domain,
                                    seeded_rng(seed, "domain-cap", domain))
    logger.info("domain %s: reading %d of %d images", domain, len(keep), len(labels))
    images = read_images([listing.paths[i] for i in keep], image_size)
    labels, origins = labels[keep], origins[keep]
    parts = _split_positions(labels, origins, fractions, seeded_rng(seed, "split", domain))

    def split(idx: np.ndarray) -> Split:
        return Split(images=images[idx], labels=labels[idx])

    return ClientData(client_id, domain, *(split(p) for p in parts))


def _split_positions(
    labels: np.ndarray, origins: np.ndarray, fractions: tuple[float, ...],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """train / val / test positions: from the fractions, or from the given split folders."""
    if (origins == "all").all():
        train, val, test = stratified_split(labels, fractions, rng)
        return train, val, test
    test = np.flatnonzero(origins == "test")
    train = np.flatnonzero(origins == "train")
    if (origins == "val").any():
        return train, np.flatnonzero(origins == "val"), test
    val_fraction = fractions[1]
    carve, keep = stratified_split(labels[train], (val_fraction, 1.0 - val_fraction), rng)
    return train[keep], train[carve], test

