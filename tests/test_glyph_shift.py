"""glyph-shift: determinism, class sets, disjoint splits, fonts, domains, cache, learnability;
and digits-shift staying byte-identical after the domain styles were opened to any ink mask."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from core.data import (
    DOMAINS,
    GLYPH_CLASSES,
    FederatedDataset,
    build_glyph_shift,
    glyph_classes,
    make_digits_shift,
    make_glyph_shift,
    render_ink,
)
from core.data.glyph_shift import SELECTION_RULE, select_class_sets
from core.data.glyphs import FONT_FILES, FONTS, atlas, confusion, font_dir, fonts_for, glyph

SPLITS = ("train", "val", "test")
SMALL = {"classes": 10, "image_size": 16, "train_per_client": 60, "val_per_client": 20,
         "test_per_client": 40, "cache": False}


def _digest(ds: FederatedDataset) -> str:
    h = hashlib.sha256()
    for client in ds.clients:
        for split in client.splits().values():
            h.update(np.ascontiguousarray(split.images).tobytes())
            h.update(split.labels.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small():
    return build_glyph_shift(0, **SMALL)


# --------------------------------------------------------------------------- digits-shift


# sha256 of every image and label array of make_digits_shift, computed before domains.py was
# refactored into render_ink (core.data.domains); the refactor must not change a byte.
@pytest.mark.parametrize("kwargs, digest", [
    ({"seed": 0}, "7f2eb43c3d607cefe4f1edea11004c29e99c0feb0191ac409dd51e810b5ca397"),
    ({"seed": 3, "image_size": 16, "clients_per_domain": 2},
     "fdca8caaeca4cf8d357f8d42aaedb0e95d5dfedebf20871a2daf4319ceceac4a"),
])
def test_digits_shift_is_byte_identical_to_before_the_refactor(kwargs, digest):
    assert _digest(make_digits_shift(**kwargs)) == digest


# --------------------------------------------------------------------------- class sets


def test_class_sets_sizes_unique_nested():
    assert sorted(GLYPH_CLASSES) == [10, 47, 100]
    for n, names in GLYPH_CLASSES.items():
        assert len(names) == n == len(set(names)) and glyph_classes(n) == names
        assert all(isinstance(c, str) and len(c) == 1 for c in names)
    assert GLYPH_CLASSES[10] == tuple("0123456789")
    assert GLYPH_CLASSES[100][:47] == GLYPH_CLASSES[47] and GLYPH_CLASSES[47][:10] == GLYPH_CLASSES[10]
    with pytest.raises(ValueError, match="class sets"):
        glyph_classes(26)


def test_class_sets_meet_the_distinctness_rule():
    names = GLYPH_CLASSES[100]
    conf = confusion(names, side=int(SELECTION_RULE["side"]))
    pair = conf + conf.T
    np.fill_diagonal(pair, 0.0)
    assert pair.max() <= SELECTION_RULE["max_confusion"]
    assert np.diag(conf).min() >= 0.5
    for gone in ("O", "I", "S", "o", "l", "s", "c", "x", "Α", "О"):  # collide with a kept class
        assert gone not in names


@pytest.mark.slow
def test_class_sets_are_what_the_measurement_selects():
    assert select_class_sets() == dict(GLYPH_CLASSES)


def test_fonts_are_bundled_and_missing_glyphs_are_skipped():
    assert len(FONT_FILES) == len(FONTS) >= 20
    assert all((font_dir() / f).is_file() for f in FONT_FILES)
    cmr = FONT_FILES.index("cmr10.ttf")
    assert glyph(cmr, "<") is None  # TeX encoding: '<' is an inverted '!' there
    assert glyph(cmr, "Ж") is None  # not in the font
    assert glyph(FONT_FILES.index("DejaVuSans.ttf"), "Ж") is not None
    assert glyph(0, "\ue000") is None  # unmapped: would render the missing-glyph box
    assert min(len(fonts_for(c)) for c in GLYPH_CLASSES[100]) >= 6
    table = atlas(GLYPH_CLASSES[47])
    assert table.masks.shape[0] == table.count.sum() and table.count.min() >= 20


# --------------------------------------------------------------------------- the data set


def test_shapes_sizes_and_stratified_labels(small):
    ds = small.dataset
    assert ds.name == "glyph-shift" and ds.classes == GLYPH_CLASSES[10] and ds.domains == DOMAINS
    assert [c.domain for c in ds.clients] == list(DOMAINS)
    for client in ds.clients:
        for split, n in zip(SPLITS, (60, 20, 40)):
            data = client.splits()[split]
            assert data.images.shape == (n, 16, 16, 3) and data.images.dtype == np.uint8
            counts = np.bincount(data.labels, minlength=10)
            assert counts.max() - counts.min() <= 1


def test_deterministic_for_a_seed_and_different_for_another(small):
    assert _digest(build_glyph_shift(0, **SMALL).dataset) == _digest(small.dataset)
    other = make_glyph_shift(1, **SMALL)
    for a, b in zip(small.dataset.clients, other.clients):
        assert not np.array_equal(a.train.images, b.train.images)


def test_splits_are_disjoint(small):
    seen: dict[bytes, str] = {}
    for client in small.dataset.clients:
        for split, data in client.splits().items():
            for image in data.images:
                key = image.tobytes()
                assert key not in seen, f"client {client.client_id} {split} repeats an image"
                seen[key] = split


def test_each_class_is_drawn_by_several_fonts(small):
    assert small.fonts == FONT_FILES
    for client, fonts in zip(small.dataset.clients, small.font_ids):
        labels, ids = client.train.labels, fonts["train"]
        assert ids.shape == labels.shape
        for c in range(10):
            assert len(set(ids[labels == c])) >= 3
        # a font id is only ever one that draws the class
        for c, f in zip(labels, ids):
            assert glyph(int(f), GLYPH_CLASSES[10][c]) is not None


def test_domains_are_measurably_different(small):
    def stats(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float64) / 255.0
        grey = x.mean(-1)
        border = np.concatenate([grey[:, 0], grey[:, -1], grey[:, :, 0], grey[:, :, -1]], axis=1)
        return np.array([grey.mean(), (x.max(-1) - x.min(-1)).mean(),
                         grey.std(axis=(1, 2)).mean(), border.mean()])

    per_domain = {c.domain: stats(c.train.images) for c in small.dataset.clients}
    for a in DOMAINS:
        for b in DOMAINS:
            if a < b:
                assert np.abs(per_domain[a] - per_domain[b]).max() > 0.05, (a, b)


def test_larger_class_sets_and_explicit_characters():
    ds = make_glyph_shift(2, classes=100, image_size=16, train_per_client=100, val_per_client=0,
                          test_per_client=100, domains=("svhn",), cache=False)
    assert ds.num_classes == 100 and set(np.unique(ds.clients[0].train.labels)) == set(range(100))
    assert len(ds.clients[0].val) == 0
    ds = make_glyph_shift(0, classes=tuple("ABΣ"), image_size=8, train_per_client=6, val_per_client=0,
                          test_per_client=3, domains=("mnist",), cache=False)
    assert ds.classes == ("A", "B", "Σ")


@pytest.mark.parametrize("kwargs, match", [
    ({"classes": 12}, "class sets"),
    ({"classes": ("A", "A")}, "distinct"),
    ({"classes": ("A",)}, "distinct"),
    ({"classes": "AB"}, "tuple of characters"),
    ({"image_size": 4}, "image_size"),
    ({"train_per_client": 0}, "train_per_client"),
    ({"test_per_client": -1}, "test_per_client"),
    ({"domains": ("mnist", "mnist")}, "repeat"),
    ({"domains": ("photo",)}, "unknown"),
    ({"clients_per_domain": 0}, "clients_per_domain"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_glyph_shift(**{**SMALL, **kwargs})


def test_render_ink_validates_its_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="fine_ink"):
        render_ink(np.zeros((2, 16, 8)), "mnist", 16, rng)
    with pytest.raises(ValueError, match="unknown domain"):
        render_ink(np.zeros((2, 16, 16)), "photo", 16, rng)
    out = render_ink(np.ones((2, 16, 16)), "usps", 12, rng)
    assert out.shape == (2, 12, 12, 3) and out.dtype == np.uint8


# --------------------------------------------------------------------------- disk cache


def test_cache_writes_once_and_loads_identical(tmp_path: Path, small):
    kwargs = {**SMALL, "cache": tmp_path}
    first = build_glyph_shift(0, **kwargs)
    files = list((tmp_path / "glyph-shift").glob("*.npz"))
    assert len(files) == 1 and _digest(first.dataset) == _digest(small.dataset)
    mtime = files[0].stat().st_mtime_ns
    again = build_glyph_shift(0, **kwargs)
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert _digest(again.dataset) == _digest(small.dataset)
    assert all(np.array_equal(a["test"], b["test"]) for a, b in zip(again.font_ids, small.font_ids))
    make_glyph_shift(0, **{**kwargs, "val_per_client": 21})  # other parameters: another file
    assert len(list((tmp_path / "glyph-shift").glob("*.npz"))) == 2
    files[0].write_bytes(b"not an npz")  # a damaged file is rebuilt, not trusted
    assert _digest(make_glyph_shift(0, **kwargs)) == _digest(small.dataset)


def test_cache_env_and_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FEDSHIFT_CACHE", str(tmp_path / "env"))
    make_glyph_shift(0, **{**SMALL, "cache": None, "domains": ("mnist",)})
    assert len(list((tmp_path / "env" / "glyph-shift").glob("*.npz"))) == 1
    make_glyph_shift(0, **{**SMALL, "cache": False, "domains": ("usps",)})
    assert len(list((tmp_path / "env" / "glyph-shift").glob("*.npz"))) == 1


def _build_in_child(cache: str) -> str:
    return _digest(make_glyph_shift(0, **{**SMALL, "cache": cache}))


def test_concurrent_builders_share_one_cache_file(tmp_path: Path):
    with mp.get_context("spawn").Pool(2) as pool:
        digests = pool.map(_build_in_child, [str(tmp_path)] * 2)
    assert digests[0] == digests[1] == _build_in_child(str(tmp_path))
    assert len(list((tmp_path / "glyph-shift").glob("*.npz"))) == 1
    assert not list((tmp_path / "glyph-shift").glob("*.tmp*"))


# --------------------------------------------------------------------------- learnable


def test_a_tiny_cnn_learns_it_far_above_chance():
    torch = pytest.importorskip("torch")
    from torch import nn

    ds = make_glyph_shift(0, classes=10, image_size=16, train_per_client=300, val_per_client=0,
                          test_per_client=100, cache=False)

    def tensors(splits):
        x = np.concatenate([s.images for s in splits])
        y = np.concatenate([s.labels for s in splits])
        return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255), torch.from_numpy(y)

    x_train, y_train = tensors([c.train for c in ds.clients])  # all five domains pooled
    x_test, y_test = tensors([c.test for c in ds.clients])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(6):
        net.train()
        for idx in torch.randperm(len(x_train), generator=order).split(64):
            loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1 (the bar: 3x chance); measured about 0.9
    assert Counter(y_test.tolist()) == Counter({c: 50 for c in range(10)})


# --------------------------------------------------------------------------- CLI


def test_cli_previews_glyph_shift(tmp_path: Path):
    from PIL import Image

    from simulations.cli import main

    out = tmp_path / "g.png"
    assert main(["data", "preview", "--dataset", "glyph-shift", "--classes", "47",
                 "--image-size", "16", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 100
