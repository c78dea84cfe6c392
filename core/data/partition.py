"""Label-stratified partitioning: shards for clients, train/val/test splits, capped subsets.

Everything is stratified by label so that a client's data differs from another's in *style*
(the domain) and not by accident in its label mix: the benchmark is a feature shift, not a
label shift. All functions return sorted index arrays and are deterministic given the rng.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


def stream_key(name: str) -> int:
    """A stable integer for a stream name (crc32; Python's hash() changes between runs)."""
    return zlib.crc32(name.encode("utf-8"))


def seeded_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """An rng for one named purpose, independent of every other (seed, keys) pair; the same
    (seed, keys) always gives the same stream."""
    ints = [int(k) if not isinstance(k, str) else stream_key(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *ints]))


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    return labels


def _class_blocks(labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of each class (ascending class order), each shuffled."""
    return [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]


def stratified_partition(
    labels: np.ndarray, n_shards: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split all indices into `n_shards` disjoint shards with every class spread evenly.

    The shuffled indices of each class are laid end to end (class by class) and dealt round
    robin, so each class's count differs by at most 1 across shards and so do shard sizes.
    """
    labels = _as_labels(labels)
    if not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    if n_shards > len(labels):
        raise ValueError(f"cannot make {n_shards} shards from {len(labels)} samples")
    order = np.concatenate(_class_blocks(labels, rng)) if len(labels) else np.empty(0, np.int64)
    shard_of = np.arange(len(order)) % n_shards
    return [np.sort(order[shard_of == k]).astype(np.int64) for k in range(n_shards)]


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) == 0 or np.any(f < 0) or not np.isfinite(f).all():
        raise ValueError(f"fractions must be non-negative numbers, got {fractions!r}")
    if abs(f.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1 (nothing is dropped), got sum {f.sum():.6g}")
    return f


def train_val_test_fractions(val_fraction: float, test_fraction: float) -> tuple[float, ...]:
    """Validated (train, val, test) fractions; training must keep a positive share."""
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(frac, (int, float, np.floating)) or not 0.0 <= float(frac) < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training data, "
            f"got {val_fraction} + {test_fraction}"
        )
    return (1.0 - val_fraction - test_fraction, float(val_fraction), float(test_fraction))


def _apportion(n: int, fractions: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, close to n*fractions + carry (the running rounding error
    of earlier classes, so that split totals stay on target); every split with a positive
    fraction gets at least one item when n allows it."""
    ideal = n * fractions + carry
    counts = np.floor(np.clip(ideal, 0.0, None)).astype(np.int64)
    while counts.sum() < n:
        counts[np.argmax(ideal - counts)] += 1
    while counts.sum() > n:
        counts[np.argmax(np.where(counts > 0, counts - ideal, -np.inf))] -= 1
    wanted = fractions > 0
    if n >= wanted.sum():
        for j in np.flatnonzero(wanted & (counts == 0)):
            counts[np.argmax(counts)] -= 1
            counts[j] += 1
    return counts


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Split positions 0..len(labels)-1 into len(fractions) disjoint parts, per class.

    `fractions` (e.g. train/val/test) must sum to 1. Each part gets every class whenever that
    class has at least as many samples as there are parts with a positive fraction; per-class
    counts are within about one of n_c * fraction and part totals within one of N * fraction.
    """
    labels = _as_labels(labels)
    f = _check_fractions(fractions)
    carry = np.zeros(len(f))
    parts: list[list[np.ndarray]] = [[] for _ in f]
    for block in _class_blocks(labels, rng):
        counts = _apportion(len(block), f, carry)
        carry = carry + len(block) * f - counts
        for part, chunk in zip(parts, np.split(block, np.cumsum(counts)[:-1])):
            part.append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64)
            for p in parts]


def stratified_subsample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly min(n, len(labels)) positions keeping class proportions (largest remainder);
    used to cap a training split or a domain without changing its label mix."""
    labels = _as_labels(labels)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"subsample size must be a positive integer, got {n!r}")
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    blocks = _class_blocks(labels, rng)
    sizes = np.array([len(b) for b in blocks])
    ideal = n * sizes / sizes.sum()
    quota = np.floor(ideal).astype(np.int64)
    # Largest remainder; ties go to the class with more samples, then the lower class.
    rest = np.lexsort((np.arange(len(sizes)), -sizes, -(ideal - quota)))
    quota[rest[: n - quota.sum()]] += 1
    return np.sort(np.concatenate([b[:q] for b, q in zip(blocks, quota)])).astype(np.int64)
