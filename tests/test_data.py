"""The built-in digits-shift benchmark: determinism, partitioning, domain styles, preview."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression, RidgeClassifier

from core.data import (
    DOMAINS,
    ClientData,
    FederatedDataset,
    Split,
    make_digits_shift,
    render,
    save_preview,
    stratified_partition,
    stratified_split,
    stratified_subsample,
)
from core.data.preview import preview_size

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


@pytest.fixture(scope="module")
def ds() -> FederatedDataset:
    return make_digits_shift(seed=0)


@pytest.fixture(scope="module")
def ds16() -> FederatedDataset:
    return make_digits_shift(seed=0, image_size=16)


@pytest.fixture(scope="module")
def mnist_only() -> FederatedDataset:
    """Five clients all in the (rng-free) mnist style: an image identifies its source digit."""
    return make_digits_shift(seed=0, domains=("mnist",), clients_per_domain=5)


def _split_bytes(ds: FederatedDataset) -> list[bytes]:
    return [getattr(c, s).images.tobytes() + getattr(c, s).labels.tobytes()
            for c in ds.clients for s in SPLITS]


def _rows(images: np.ndarray) -> Counter:
    return Counter(img.tobytes() for img in images)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(ds: FederatedDataset) -> None:
    assert _split_bytes(make_digits_shift(seed=0)) == _split_bytes(ds)


def test_different_seed_differs(ds: FederatedDataset) -> None:
    other = _split_bytes(make_digits_shift(seed=1))
    assert all(a != b for a, b in zip(other, _split_bytes(ds)))


def test_render_is_deterministic_from_rng(digits) -> None:
    images = digits[0][:20]
    for domain in DOMAINS:
        a = render(images, domain, 24, np.random.default_rng(5))
        b = render(images, domain, 24, np.random.default_rng(5))
        assert a.dtype == np.uint8 and a.shape == (20, 24, 24, 3)
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- partitioning


def test_shards_cover_all_digits_exactly_once(mnist_only: FederatedDataset, digits) -> None:
    every = render(digits[0], "mnist", 32, np.random.default_rng(0))
    got = Counter()
    for client in mnist_only.clients:
        for split in SPLITS:
            got += _rows(getattr(client, split).images)
    assert got == _rows(every)  # disjoint across clients and splits, nothing dropped
    assert max(got.values()) == 1


def test_shards_and_splits_are_stratified(ds: FederatedDataset, digits) -> None:
    totals = np.array([np.bincount(np.concatenate([getattr(c, s).labels for s in SPLITS]),
                                   minlength=10) for c in ds.clients])
    assert (totals.max(axis=0) - totals.min(axis=0) <= 1).all()
    assert totals.sum() == len(digits[1])
    for client in ds.clients:
        for split in SPLITS:
            counts = np.bincount(getattr(client, split).labels, minlength=10)
            assert (counts > 0).all(), (client.domain, split, counts)
        n = sum(len(getattr(client, s)) for s in SPLITS)
        assert abs(len(client.train) - 0.6 * n) <= 1.5
        assert abs(len(client.val) - 0.15 * n) <= 1.5
        assert abs(len(client.test) - 0.25 * n) <= 1.5


def test_label_distribution_is_the_same_for_every_domain(ds: FederatedDataset) -> None:
    train = np.array([np.bincount(c.train.labels, minlength=10) for c in ds.clients])
    assert (train.max(axis=0) - train.min(axis=0) <= 2).all()
    assert [c.domain for c in ds.clients] == list(DOMAINS)
    assert ds.classes == tuple("0123456789") and ds.num_classes == 10


def test_train_per_client_caps_training_split_stratified(ds: FederatedDataset) -> None:
    capped = make_digits_shift(seed=0, train_per_client=30)
    for full, small in zip(ds.clients, capped.clients):
        assert len(small.train) == 30
        assert (np.bincount(small.train.labels, minlength=10) == 3).all()
        assert _rows(small.train.images) <= _rows(full.train.images)  # a subset
        np.testing.assert_array_equal(small.test.images, full.test.images)


def test_clients_per_domain(mnist_only: FederatedDataset) -> None:
    assert [c.domain for c in mnist_only.clients] == ["mnist"] * 5
    assert [c.client_id for c in mnist_only.clients] == [0, 1, 2, 3, 4]


def test_stratified_partition_counts(digits) -> None:
    labels = digits[1]
    shards = stratified_partition(labels, 7, np.random.default_rng(0))
    joined = np.concatenate(shards)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    per_class = np.array([np.bincount(labels[s], minlength=10) for s in shards])
    assert (per_class.max(axis=0) - per_class.min(axis=0) <= 1).all()
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_stratified_split_and_subsample() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=203)
    parts = stratified_split(labels, (0.6, 0.15, 0.25), np.random.default_rng(1))
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    for part, frac in zip(parts, (0.6, 0.15, 0.25)):
        assert abs(len(part) - frac * len(labels)) <= 1.5
        assert set(labels[part]) == {0, 1, 2, 3}
    tiny = stratified_split(np.array([0, 0, 0, 1, 1, 1]), (0.8, 0.1, 0.1), rng)
    assert all(set(np.array([0, 0, 0, 1, 1, 1])[p]) == {0, 1} for p in tiny)
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, (0.5, 0.2), rng)
    keep = stratified_subsample(labels, 40, rng)
    assert len(keep) == 40 and len(set(keep)) == 40
    share = np.bincount(labels[keep], minlength=4) / 40 - np.bincount(labels, minlength=4) / 203
    assert np.abs(share).max() < 1 / 40 + 1e-9


# --------------------------------------------------------------------------- domain styles


def _style_features(images: np.ndarray) -> np.ndarray:
    """mean, saturation, contrast, border texture, colour spread inside the image."""
    x = images.astype(np.float64) / 255.0
    hi, lo = x.max(axis=-1), x.min(axis=-1)
    grey = x.mean(axis=-1)
    border = np.concatenate([grey[:, :3].reshape(len(x), -1), grey[:, -3:].reshape(len(x), -1)], 1)
    chroma = x - grey[..., None]
    return np.stack([
        x.mean(axis=(1, 2, 3)),
        ((hi - lo) / np.maximum(hi, 1e-6)).mean(axis=(1, 2)),
        grey.std(axis=(1, 2)),
        border.std(axis=1),
        chroma.reshape(len(x), -1, 3).std(axis=1).mean(axis=1),
    ], axis=1)


def test_domains_have_distinct_statistics(ds: FederatedDataset) -> None:
    stats = {c.domain: _style_features(c.train.images).mean(axis=0) for c in ds.clients}
    mean = {d: s[0] for d, s in stats.items()}
    sat = {d: s[1] for d, s in stats.items()}
    assert mean["mnist"] < mean["usps"] - 0.08  # black background vs. grey, fills the frame
    assert mean["inverse"] > max(v for d, v in mean.items() if d != "inverse") + 0.1
    assert sat["mnist"] == sat["usps"] == 0.0  # grey styles
    assert min(sat["inverse"], sat["mnistm"], sat["svhn"]) > 0.15
    assert stats["mnistm"][4] > stats["svhn"][4] + 0.03  # many colours vs. one palette


def test_domain_is_recognisable_from_style_alone(ds: FederatedDataset) -> None:
    """A linear model on five image statistics tells the domains apart: a real feature shift."""
    x_train = np.concatenate([_style_features(c.train.images) for c in ds.clients])
    y_train = np.concatenate([[k] * len(c.train) for k, c in enumerate(ds.clients)])
    x_test = np.concatenate([_style_features(c.test.images) for c in ds.clients])
    y_test = np.concatenate([[k] * len(c.test) for k, c in enumerate(ds.clients)])
    scale = x_train.std(axis=0) + 1e-9
    clf = LogisticRegression(max_iter=2000).fit(x_train / scale, y_train)
    assert clf.score(x_test / scale, y_test) > 0.9


def test_digits_stay_readable_in_every_domain(ds16: FederatedDataset) -> None:
    """Labels keep their meaning: a linear model on background-subtracted pixels reads the
    digit well above chance (10%) in every style."""
    for client in ds16.clients:
        def features(split: Split) -> np.ndarray:
            grey = split.images.astype(np.float64).mean(axis=-1)
            edge = np.concatenate([grey[:, 0], grey[:, -1]], axis=1)
            dev = np.abs(grey - np.median(edge, axis=1)[:, None, None])
            return (dev / (dev.max(axis=(1, 2), keepdims=True) + 1e-6)).reshape(len(grey), -1)

        clf = RidgeClassifier(alpha=1.0).fit(features(client.train), client.train.labels)
        assert clf.score(features(client.test), client.test.labels) > 0.4, client.domain


def test_grey_styles_have_equal_channels(ds: FederatedDataset) -> None:
    for client in ds.clients:
        grey = (client.train.images == client.train.images[..., :1]).all()
        assert grey == (client.domain in ("mnist", "usps"))


@pytest.mark.parametrize("size", [16, 32, 48])
def test_image_size_is_honoured(size: int, ds: FederatedDataset, ds16: FederatedDataset) -> None:
    built = {16: ds16, 32: ds}.get(size) or make_digits_shift(seed=2, image_size=size,
                                                               domains=("svhn", "usps"))
    assert built.image_size == size
    for client in built.clients:
        for split in SPLITS:
            images = getattr(client, split).images
            assert images.shape[1:] == (size, size, 3) and images.dtype == np.uint8


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 7}, "image_size"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "< 1"),
    ({"test_fraction": -0.1}, "test_fraction"),
    ({"domains": ("mnist", "photo")}, "valid: mnist, inverse, mnistm, usps, svhn"),
    ({"domains": ("mnist", "mnist")}, "repeat"),
    ({"domains": "mnist"}, "sequence"),
    ({"clients_per_domain": 20}, "at most"),
    ({"train_per_client": 0}, "train_per_client"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_digits_shift(**kwargs)


def test_render_rejects_unknown_domain(digits) -> None:
    with pytest.raises(ValueError, match="valid domains: mnist, inverse"):
        render(digits[0][:2], "sketch", 32, np.random.default_rng(0))


def test_types_validate_arrays() -> None:
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        Split(images.astype(np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(images, np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        Split(images, np.zeros(3, np.int64))
    split = Split(images, np.array([0, 1]))
    assert len(split) == 2
    client = ClientData(0, "a", split, split, split)
    with pytest.raises(ValueError, match="expected \\(16, 16\\)"):
        FederatedDataset("x", ("0", "1"), ("a",), (client,), image_size=16)
    with pytest.raises(ValueError, match="out of range"):
        FederatedDataset("x", ("0",), ("a",), (client,), image_size=8)


# --------------------------------------------------------------------------- preview


def test_preview_writes_png_of_expected_size(ds: FederatedDataset, tmp_path) -> None:
    path = save_preview(ds, tmp_path / "nested" / "preview.png", per_client=12)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == preview_size(len(ds.clients), 12, ds.image_size)
        pixels = np.asarray(img)
    assert pixels.std() > 10  # not blank
