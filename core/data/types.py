"""The data types every stage shares: a split, one client's data, a federated dataset.

They are frozen and validated on construction so that a malformed array is refused where it is
made, not three stages later inside a training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DatasetError(ValueError):
    """A dataset path or layout is missing or malformed; the message names the path and what
    was expected there."""


@dataclass(frozen=True)
class Split:
    """Images and labels of one split.

    images: (N, H, W, 3) uint8 RGB; labels: (N,) int64 class indices.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(
                f"Split.images must be an (N, H, W, 3) array, got "
                f"{getattr(images, 'shape', type(images).__name__)}"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"Split.images must be uint8, got {images.dtype}")
        if not isinstance(labels, np.ndarray) or labels.ndim != 1:
            raise ValueError(
                f"Split.labels must be an (N,) array, got "
                f"{getattr(labels, 'shape', type(labels).__name__)}"
            )
        if labels.dtype != np.int64:
            raise ValueError(f"Split.labels must be int64, got {labels.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"Split has {len(images)} images but {len(labels)} labels")
        if len(labels) and labels.min() < 0:
            raise ValueError(f"Split.labels must be non-negative, got min {labels.min()}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class ClientData:
    """One federated client: a single domain with its own train / val / test splits."""

    client_id: int
    domain: str
    train: Split
    val: Split
    test: Split

    def splits(self) -> dict[str, Split]:
        """The three splits by name, for code that iterates over them."""
        return {"train": self.train, "val": self.val, "test": self.test}


@dataclass(frozen=True)
class FederatedDataset:
    """A feature-shift benchmark: every client shares `classes`, each lives in one of `domains`."""

    name: str
    classes: tuple[str, ...]
    domains: tuple[str, ...]
    clients: tuple[ClientData, ...]
    image_size: int

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError(f"dataset {self.name!r} has no classes")
        ids = [c.client_id for c in self.clients]
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset {self.name!r} has duplicate client ids {ids}")
        for client in self.clients:
            if client.domain not in self.domains:
                raise ValueError(
                    f"client {client.client_id} has domain {client.domain!r}, "
                    f"not one of {self.domains}"
                )
            for split_name, split in client.splits().items():
                _check_split(self, client, split_name, split)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _check_split(ds: FederatedDataset, client: ClientData, name: str, split: Split) -> None:
    """Refuse a split whose image size or labels do not fit the dataset."""
    where = f"dataset {ds.name!r} client {client.client_id} ({client.domain}) {name}"
    if split.images.shape[1:3] != (ds.image_size, ds.image_size):
        raise ValueError(
            f"{where}: images are {split.images.shape[1:3]}, expected "
            f"({ds.image_size}, {ds.image_size})"
        )
    if len(split) and split.labels.max() >= len(ds.classes):
        raise ValueError(
            f"{where}: label {split.labels.max()} out of range for {len(ds.classes)} classes"
        )
