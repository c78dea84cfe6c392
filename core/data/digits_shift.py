"""`digits-shift`: the built-in, offline feature-shift benchmark.

scikit-learn ships 1,797 handwritten 8x8 digits; we split them into disjoint label-stratified
shards, one per client, and render each shard in its client's domain style. Clients thus share
labels but not features (the FedBN / FRAug setting) and nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .domains import DOMAINS, check_domains, render
from .partition import (
    seeded_rng,
    stratified_partition,
    stratified_split,
    stratified_subsample,
    train_val_test_fractions,
)
from .types import ClientData, FederatedDataset, Split

logger = logging.getLogger(__name__)

NAME = "digits-shift"
_N_SPLITS = 3  # train, val, test


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) float in [0, 16] and (N,) int64 labels; sklearn is imported only when used."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def _validate(
    seed: int,
    image_size: int,
    domains: Sequence[str],
    clients_per_domain: int,
    val_fraction: float,
    test_fraction: float,
    train_per_client: int | None,
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    def is_int(x: object) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not is_int(image_size) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    doms = check_domains(domains)
    if not is_int(clients_per_domain) or clients_per_domain < 1:
        raise ValueError(
            f"clients_per_domain must be a positive integer, got {clients_per_domain!r}"
        )
    if train_per_client is not None and (not is_int(train_per_client) or train_per_client < 1):
        raise ValueError(
            f"train_per_client must be None or a positive integer, got {train_per_client!r}"
        )
    fractions = train_val_test_fractions(val_fraction, test_fraction)
    return doms, fractions


def make_digits_shift(
    seed: int = 0,
    image_size: int = 32,
    domains: Sequence[str] = DOMAINS,
    clients_per_domain: int = 1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    train_per_client: int | None = None,
) -> FederatedDataset:
    """Build the digits feature-shift benchmark.

    Client k gets shard k of a label-stratified partition of the 1,797 digits, rendered in
    domain ``domains[k // clients_per_domain]``, split per class into train/val/test;
    ``train_per_client`` caps the training split (stratified). Same arguments give
    byte-identical arrays.
    """
    doms, fractions = _validate(seed, image_size, domains, clients_per_domain,
                                val_fraction, test_fraction, train_per_client)
    digits, labels = _load_digits()
    n_clients = len(doms) * clients_per_domain
    max_clients = int(np.bincount(labels).min()) // _N_SPLITS
    if n_clients > max_clients:
        raise ValueError(
            f"{n_clients} clients leave too few digits per class for train/val/test; "
            f"at most {max_clients} clients"
        )
    shards = stratified_partition(labels, n_clients, seeded_rng(seed, "partition", n_clients))
    clients = tuple(
        _make_client(k, doms[k // clients_per_domain], digits[shard], labels[shard],
                     image_size, fractions, train_per_client, seed)
        for k, shard in enumerate(shards)
    )
    logger.info(
        "%s: %d clients over %s, %dx%d, train/val/test sizes %s",
        NAME, n_clients, ",".join(doms), image_size, image_size,
        [(len(c.train), len(c.val), len(c.test)) for c in clients],
    )
    return FederatedDataset(
        name=NAME,
        classes=tuple(str(d) for d in range(10)),
        domains=doms,
        clients=clients,
        image_size=image_size,
    )


def _make_client(
    client_id: int,
    domain: str,
    digits: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    fractions: tuple[float, ...],
    train_per_client: int | None,
    seed: int,
) -> ClientData:
    """Render one shard in its domain and split it; each client has its own rng streams."""
    images = render(digits, domain, image_size, seeded_rng(seed, "render", client_id))
    train, val, test = stratified_split(labels, fractions, seeded_rng(seed, "split", client_id))
    if train_per_client is not None:
        if train_per_client > len(train):
            logger.info(
                "client %d: train_per_client=%d exceeds its %d training images; keeping all",
                client_id, train_per_client, len(train),
            )
        keep = stratified_subsample(labels[train], train_per_client,
                                    seeded_rng(seed, "train-cap", client_id))
        train = train[keep]

    def split(idx: np.ndarray) -> Split:
        return Split(images=np.ascontiguousarray(images[idx]), labels=labels[idx].copy())

    return ClientData(client_id=client_id, domain=domain,
                      train=split(train), val=split(val), test=split(test))
