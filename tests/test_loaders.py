"""Loaders for the user's own benchmark folders and the CIFAR-C / ImageNet-C layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import DatasetError, load_cifar_c, load_domain_folders, load_imagenet_c

CLASSES = ("cat", "dog", "horse")
COLOURS = {"cat": (250, 10, 10), "dog": (10, 250, 10), "horse": (10, 10, 250)}
FORMATS = (".png", ".jpg", ".BMP", ".jpeg")


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 14)) -> None:
    """A solid-colour image (its class can be read back from the pixels after resizing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".png": "PNG"}[path.suffix.lower()]
    Image.new("RGB", size, colour).save(path, format=fmt)


def _class_tree(folder: Path, per_class: int, classes=CLASSES) -> None:
    for name in classes:
        for i in range(per_class):
            _image(folder / name / f"img{i}{FORMATS[i % len(FORMATS)]}", COLOURS[name])


def _labels_match_colours(split, classes) -> bool:
    """Every image's dominant channel is its label's colour."""
    dominant = split.images.reshape(len(split), -1, 3).mean(axis=1).argmax(axis=1)
    expected = np.array([np.argmax(COLOURS[classes[label]]) for label in split.labels])
    return bool(np.array_equal(dominant, expected))


@pytest.fixture()
def class_folders(tmp_path: Path) -> Path:
    """PACS / Office-Caltech style: root/<domain>/<class>/<images>."""
    for domain in ("photo", "sketch"):
        _class_tree(tmp_path / domain, per_class=5)
    (tmp_path / "photo" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "photo" / ".DS_Store").write_text("hidden")
    return tmp_path


# --------------------------------------------------------------------------- layouts


def test_class_folder_layout(class_folders: Path) -> None:
    ds = load_domain_folders(class_folders, image_size=16, seed=0)
    assert ds.domains == ("photo", "sketch") and ds.classes == CLASSES
    assert [c.client_id for c in ds.clients] == [0, 1] and ds.image_size == 16
    for client in ds.clients:
        splits = client.splits().values()
        assert sum(len(s) for s in splits) == 15  # the .txt file is skipped, nothing else
        for split in splits:
            assert split.images.shape[1:] == (16, 16, 3) and split.images.dtype == np.uint8
            assert set(split.labels.tolist()) == {0, 1, 2}  # every class in every split
            assert _labels_match_colours(split, ds.classes)


def test_class_folder_layout_is_seeded(class_folders: Path) -> None:
    a = load_domain_folders(class_folders, image_size=8, seed=1)
    b = load_domain_folders(class_folders, image_size=8, seed=1)
    for ca, cb in zip(a.clients, b.clients):
        for name in ("train", "val", "test"):
            np.testing.assert_array_equal(getattr(ca, name).labels, getattr(cb, name).labels)


def test_domain_subset_and_cap(class_folders: Path) -> None:
    ds = load_domain_folders(class_folders, image_size=8, domains=["sketch"], max_per_domain=6)
    assert ds.domains == ("sketch",) and len(ds.clients) == 1
    client = ds.clients[0]
    labels = np.concatenate([s.labels for s in client.splits().values()])
    assert len(labels) == 6 and (np.bincount(labels) == 2).all()


def test_train_test_folder_layout(tmp_path: Path) -> None:
    """Digits-5 style: root/<domain>/{train,test}/<class>/; the test folder is the test split."""
    for domain in ("mnist", "usps"):
        _class_tree(tmp_path / domain / "train", per_class=6)
        _class_tree(tmp_path / domain / "test", per_class=2)
    ds = load_domain_folders(tmp_path, image_size=12, val_fraction=0.34)
    assert ds.classes == CLASSES
    for client in ds.clients:
        assert len(client.test) == 6
        assert len(client.train) + len(client.val) == 18 and len(client.val) == 6
        for split in client.splits().values():
            assert _labels_match_colours(split, ds.classes)


def test_train_val_test_folder_layout(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        _class_tree(tmp_path / "a" / split, per_class=n)
    client = load_domain_folders(tmp_path, image_size=8).clients[0]
    assert (len(client.train), len(client.val), len(client.test)) == (9, 3, 6)


def test_split_file_layout(tmp_path: Path) -> None:
    """DomainNet: root/<domain>_{train,test}.txt with '<domain>/<class>/<file> <label>'."""
    for domain in ("clipart", "real"):
        _class_tree(tmp_path / domain, per_class=4)
        for split, files in (("train", range(3)), ("test", range(3, 4))):
            lines = [f"{domain}/{name}/img{i}{FORMATS[i % len(FORMATS)]} {label}"
                     for label, name in enumerate(CLASSES) for i in files]
            (tmp_path / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    ds = load_domain_folders(tmp_path, image_size=10, val_fraction=0.34)
    assert ds.domains == ("clipart", "real") and ds.classes == CLASSES
    for client in ds.clients:
        assert len(client.test) == 3 and len(client.train) + len(client.val) == 9
        assert set(client.val.labels.tolist()) == {0, 1, 2}
        for split in client.splits().values():
            assert _labels_match_colours(split, ds.classes)


# --------------------------------------------------------------------------- bad folders


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
        load_domain_folders(tmp_path / "nope")


def test_root_without_domains(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"{tmp_path} contains no domains"):
        load_domain_folders(tmp_path)


def test_unknown_domain(class_folders: Path) -> None:
    with pytest.raises(DatasetError, match=str(class_folders / "cartoon")):
        load_domain_folders(class_folders, domains=["photo", "cartoon"])


def test_empty_domain(class_folders: Path) -> None:
    (class_folders / "art").mkdir()
    with pytest.raises(DatasetError, match=f"{class_folders / 'art'} has no class sub-folders"):
        load_domain_folders(class_folders)


def test_class_folder_without_images(class_folders: Path) -> None:
    for image in (class_folders / "sketch" / "dog").iterdir():
        image.unlink()
    (class_folders / "sketch" / "dog" / "readme.md").write_text("x")
    with pytest.raises(DatasetError, match=f"{class_folders / 'sketch' / 'dog'} contains no image"):
        load_domain_folders(class_folders)


def test_mismatched_classes_name_domain_and_classes(class_folders: Path) -> None:
    _class_tree(class_folders / "sketch", per_class=1, classes=("cat",))
    (class_folders / "sketch" / "zebra").mkdir()
    _image(class_folders / "sketch" / "zebra" / "z.png", (1, 2, 3))
    with pytest.raises(DatasetError) as info:
        load_domain_folders(class_folders)
    message = str(info.value)
    assert "sketch" in message and str(class_folders / "sketch") in message
    assert "extra ['zebra']" in message


def test_train_and_test_folders_must_share_classes(tmp_path: Path) -> None:
    _class_tree(tmp_path / "d" / "train", per_class=2)
    _class_tree(tmp_path / "d" / "test", per_class=2, classes=("cat", "dog"))
    with pytest.raises(DatasetError, match=f"{tmp_path / 'd' / 'test'}.*missing \\['horse'\\]"):
        load_domain_folders(tmp_path)


def test_unreadable_image_names_the_file(class_folders: Path) -> None:
    bad = class_folders / "photo" / "dog" / "broken.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(DatasetError, match=f"cannot read image file {bad}"):
        load_domain_folders(class_folders)


def test_split_file_errors(tmp_path: Path) -> None:
    _class_tree(tmp_path / "real", per_class=1)
    (tmp_path / "real_train.txt").write_text("real/cat/img0.png 0\n")
    with pytest.raises(DatasetError, match="real_test.txt"):
        load_domain_folders(tmp_path)
    (tmp_path / "real_test.txt").write_text("real/cat/img0.png zero\n")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'real_test.txt'}:1: expected"):
        load_domain_folders(tmp_path)
    (tmp_path / "real_test.txt").write_text("real/cat/missing.png 0\n")
    with pytest.raises(DatasetError, match=str(tmp_path / "real" / "cat" / "missing.png")):
        load_domain_folders(tmp_path)
    (tmp_path / "real_test.txt").write_text("real/cat/img0.png 1\n")
    with pytest.raises(DatasetError, match="class 'cat' has label 1, but 0 elsewhere"):
        load_domain_folders(tmp_path)


# --------------------------------------------------------------------------- CIFAR-C


@pytest.fixture()
def cifar_c(tmp_path: Path) -> Path:
    """Four images per severity; image k of severity s has pixel value 10*s + k."""
    n = 4
    values = np.array([10 * s + k for s in range(1, 6) for k in range(n)], dtype=np.uint8)
    np.save(tmp_path / "fog.npy", np.broadcast_to(values[:, None, None, None], (5 * n, 32, 32, 3)))
    np.save(tmp_path / "labels.npy", np.tile(np.arange(n), 5))
    return tmp_path


def test_cifar_c_severity_block(cifar_c: Path) -> None:
    split = load_cifar_c(cifar_c, "fog", 3)
    assert split.images.shape == (4, 32, 32, 3) and split.images.dtype == np.uint8
    np.testing.assert_array_equal(split.images[:, 0, 0, 0], [30, 31, 32, 33])
    np.testing.assert_array_equal(split.labels, [0, 1, 2, 3])
    assert split.labels.dtype == np.int64


def test_cifar_c_labels_of_one_block_are_tiled(cifar_c: Path) -> None:
    np.save(cifar_c / "labels.npy", np.array([3, 2, 1, 0]))
    np.testing.assert_array_equal(load_cifar_c(cifar_c, "fog", 5).labels, [3, 2, 1, 0])


@pytest.mark.parametrize("severity", [0, 6, 2.5, True])
def test_cifar_c_bad_severity(cifar_c: Path, severity) -> None:
    with pytest.raises(DatasetError, match=f"severity .* for {cifar_c / 'fog.npy'}"):
        load_cifar_c(cifar_c, "fog", severity)


def test_cifar_c_missing_files(cifar_c: Path) -> None:
    with pytest.raises(DatasetError, match=f"{cifar_c / 'snow.npy'} does not exist.*\\['fog'\\]"):
        load_cifar_c(cifar_c, "snow", 1)
    with pytest.raises(DatasetError, match="not a plain name"):
        load_cifar_c(cifar_c, "../fog", 1)
    (cifar_c / "labels.npy").unlink()
    with pytest.raises(DatasetError, match=str(cifar_c / "labels.npy")):
        load_cifar_c(cifar_c, "fog", 1)
    with pytest.raises(DatasetError, match=str(cifar_c / "missing")):
        load_cifar_c(cifar_c / "missing", "fog", 1)


@pytest.mark.parametrize("array, match", [
    (np.zeros((20, 32, 32), np.uint8), "expected \\(5\\*n, H, H, 3\\)"),
    (np.zeros((21, 32, 32, 3), np.uint8), "expected \\(5\\*n, H, H, 3\\)"),
    (np.zeros((20, 32, 32, 3), np.float32), "expected uint8"),
])
def test_cifar_c_wrong_array(cifar_c: Path, array: np.ndarray, match: str) -> None:
    np.save(cifar_c / "fog.npy", array)
    with pytest.raises(DatasetError, match=f"{cifar_c / 'fog.npy'}.*{match}"):
        load_cifar_c(cifar_c, "fog", 1)


def test_cifar_c_label_count_mismatch(cifar_c: Path) -> None:
    np.save(cifar_c / "labels.npy", np.arange(7))
    with pytest.raises(DatasetError, match=f"{cifar_c / 'labels.npy'} has 7 labels; expected 20"):
        load_cifar_c(cifar_c, "fog", 1)


def test_cifar_c_unreadable_npy(cifar_c: Path) -> None:
    (cifar_c / "fog.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=f"cannot read {cifar_c / 'fog.npy'}"):
        load_cifar_c(cifar_c, "fog", 1)


# --------------------------------------------------------------------------- ImageNet-C


@pytest.fixture()
def imagenet_c(tmp_path: Path) -> Path:
    wnids = {"n01440764": "cat", "n01443537": "dog", "n01484850": "horse"}
    for wnid, colour in wnids.items():
        for i in range(3):
            _image(tmp_path / "gaussian_noise" / "2" / wnid / f"ILSVRC_{i}.JPEG", COLOURS[colour])
    return tmp_path


def test_imagenet_c_layout(imagenet_c: Path) -> None:
    split, classes = load_imagenet_c(imagenet_c, "gaussian_noise", 2, image_size=24)
    assert classes == ("n01440764", "n01443537", "n01484850")
    assert split.images.shape == (9, 24, 24, 3)
    np.testing.assert_array_equal(split.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    dominant = split.images.reshape(9, -1, 3).mean(axis=1).argmax(axis=1)
    np.testing.assert_array_equal(dominant, split.labels)  # red, green, blue


def test_imagenet_c_class_subset_and_cap(imagenet_c: Path) -> None:
    split, classes = load_imagenet_c(imagenet_c, "gaussian_noise", 2, image_size=8,
                                     classes=["n01484850", "n01440764"], max_per_class=2)
    assert classes == ("n01484850", "n01440764")
    np.testing.assert_array_equal(split.labels, [0, 0, 1, 1])
    assert split.images[0, 0, 0].argmax() == 2  # the horse folder is blue


def test_imagenet_c_errors(imagenet_c: Path) -> None:
    with pytest.raises(DatasetError, match=f"{imagenet_c / 'fog'} is missing.*gaussian_noise"):
        load_imagenet_c(imagenet_c, "fog", 2)
    with pytest.raises(DatasetError, match=str(imagenet_c / "gaussian_noise" / "3")):
        load_imagenet_c(imagenet_c, "gaussian_noise", 3)
    with pytest.raises(DatasetError, match="out of range"):
        load_imagenet_c(imagenet_c, "gaussian_noise", 9)
    with pytest.raises(DatasetError, match="n09999999"):
        load_imagenet_c(imagenet_c, "gaussian_noise", 2, classes=["n09999999"])
