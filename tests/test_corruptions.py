"""Tests for core.corruptions: contract, determinism, severity ordering, reference agreement."""

from __future__ import annotations

import numpy as np
import pytest

from core.corruptions import (
    CORRUPTIONS,
    corrupt,
    corruption_constants,
    corruption_seed,
    resolve_constants,
)

SEVERITIES = (1, 2, 3, 4, 5)
# Corruptions whose output does not depend on the seed.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate",
                 "jpeg_compression"}
RANDOM = tuple(c for c in CORRUPTIONS if c not in DETERMINISTIC)


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Natural-looking stand-ins: smooth colour gradients, discs, boxes and a soft texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        img = rng.uniform(0.2, 0.8, 3) + rng.uniform(-0.4, 0.4, 3) * xx[..., None] \
            + rng.uniform(-0.4, 0.4, 3) * yy[..., None]
        for _ in range(4):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = rng.uniform(0, 1, 3)
            x0, y0 = rng.uniform(0, 0.7, 2)
            img[(xx > x0) & (xx < x0 + 0.2) & (yy > y0) & (yy < y0 + 0.1)] = rng.uniform(0, 1, 3)
        img += 0.03 * np.sin(xx[..., None] * 40 + yy[..., None] * 25)
        images.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(images)


def mean_abs_change(out: np.ndarray, images: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - images.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    images = synthetic_images(8, 32)
    images.setflags(write=False)  # any in-place write to the input raises
    return images


# ------------------------------------------------------------------------------------- contract

@pytest.mark.parametrize("constants", ["cifar", "imagenet"])
@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_contract(small: np.ndarray, name: str, severity: int, constants: str) -> None:
    before = small.copy()
    out = corrupt(small, name, severity, seed=1, constants=constants)
    assert out.dtype == np.uint8 and out.shape == small.shape
    assert out is not small and not np.shares_memory(out, small)
    np.testing.assert_array_equal(small, before)
    assert mean_abs_change(out, small) > 0.3


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_single_image_matches_batch_of_one(small: np.ndarray, name: str) -> None:
    single = corrupt(small[0], name, 3, seed=5)
    assert single.shape == small[0].shape and single.dtype == np.uint8
    np.testing.assert_array_equal(single, corrupt(small[:1], name, 3, seed=5)[0])


@pytest.mark.parametrize("name", ["fog", "elastic_transform", "pixelate", "zoom_blur"])
def test_non_square_and_64px(name: str) -> None:
    images = synthetic_images(2, 80)[:, :48, :80]  # 48x80, auto -> cifar constants
    out = corrupt(images, name, 4, seed=0)
    assert out.shape == images.shape
    big = synthetic_images(2, 96)  # auto -> imagenet constants
    assert corrupt(big, name, 4, seed=0).shape == big.shape


def test_empty_batch() -> None:
    images = np.zeros((0, 32, 32, 3), np.uint8)
    assert corrupt(images, "fog", 1, seed=0).shape == images.shape


# ---------------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_seed_same_bytes(small: np.ndarray, name: str) -> None:
    a = corrupt(small, name, 4, seed=11)
    b = corrupt(small, name, 4, seed=11)
    assert a.tobytes() == b.tobytes()
    c = corrupt(small, name, 4, seed=np.random.default_rng(3))
    d = corrupt(small, name, 4, seed=np.random.default_rng(3))
    assert c.tobytes() == d.tobytes()


@pytest.mark.parametrize("name", RANDOM)
def test_different_seeds_differ(small: np.ndarray, name: str) -> None:
    assert not np.array_equal(corrupt(small, name, 4, seed=1), corrupt(small, name, 4, seed=2))


@pytest.mark.parametrize("name", ["gaussian_noise", "frost", "glass_blur"])
def test_global_numpy_rng_untouched(small: np.ndarray, name: str) -> None:
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    first = corrupt(small, name, 2, seed=4)
    assert np.array_equal(np.random.get_state()[1], state)
    np.random.seed(999)
    np.testing.assert_array_equal(first, corrupt(small, name, 2, seed=4))


def test_corruption_seed_is_stable_and_keyed() -> None:
    # Pinned values: string keys go through CRC-32, never Python's salted hash().
    np.testing.assert_array_equal(corruption_seed(0, "fog", 3).integers(0, 2 ** 31, size=3),
                                  [219652087, 1878717932, 589780990])
    draws = {keys: corruption_seed(0, *keys).random() for keys in
             [("fog", 3), ("fog", 4), ("snow", 3), (), ("fog",)]}
    assert len(set(draws.values())) == len(draws)
    assert corruption_seed(1, "fog", 3).random() != draws[("fog", 3)]
    with pytest.raises(ValueError):
        corruption_seed(0, -1)
    with pytest.raises(TypeError):
        corruption_seed(0, 1.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- severity

@pytest.mark.parametrize("constants", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_5_stronger_than_1(name: str, constants: str) -> None:
    images = synthetic_images(16, 32, seed=5)
    # Same generator state at both severities: only the constants differ.
    weak = mean_abs_change(corrupt(images, name, 1, seed=np.random.default_rng(7),
                                   constants=constants), images)
    strong = mean_abs_change(corrupt(images, name, 5, seed=np.random.default_rng(7),
                                     constants=constants), images)
    if (name, constants) == ("elastic_transform", "cifar"):
        # CIFAR-10-C's elastic severity 1 is a pure random affine (corner jitter 8% of the side,
        # alpha = 0); higher severities trade affine jitter (down to 3%) for a local elastic field
        # (alpha up to 10%).  In pixel terms severity 1 therefore moves the image *more*.
        jitters = [corruption_constants(name, s, "cifar")[2] for s in SEVERITIES]
        alphas = [corruption_constants(name, s, "cifar")[0] for s in SEVERITIES]
        assert jitters == sorted(jitters, reverse=True) and alphas == sorted(alphas)
        assert weak > strong > 0.3 * weak
    else:
        assert strong > weak


# --------------------------------------------------------------------------------------- errors

def test_errors(small: np.ndarray) -> None:
    with pytest.raises(ValueError, match="gaussian_noise.*jpeg_compression"):
        corrupt(small, "speckle_noise", 1, seed=0)
    for bad in (0, 6, 2.5, True, "3"):
        with pytest.raises(ValueError, match="severity"):
            corrupt(small, "fog", bad, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        corrupt(small.astype(np.float32), "fog", 1, seed=0)
    with pytest.raises(ValueError, match="shape"):
        corrupt(small[0, :, :, 0], "fog", 1, seed=0)
    with pytest.raises(ValueError, match="shape"):
        corrupt(small[None], "fog", 1, seed=0)
    with pytest.raises(ValueError, match="channels"):
        corrupt(np.zeros((2, 32, 32, 4), np.uint8), "fog", 1, seed=0)
    with pytest.raises(ValueError, match="at least"):
        corrupt(np.zeros((2, 4, 32, 3), np.uint8), "fog", 1, seed=0)
    with pytest.raises(ValueError, match="numpy array"):
        corrupt(small.tolist(), "fog", 1, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="constants"):
        corrupt(small, "fog", 1, seed=0, constants="tiny")
    with pytest.raises(TypeError, match="seed"):
        corrupt(small, "fog", 1, seed=1.5)  # type: ignore[arg-type]


def test_auto_constants() -> None:
    assert resolve_constants("auto", 32, 32) == "cifar"
    assert resolve_constants("auto", 64, 200) == "cifar"
    assert resolve_constants("auto", 65, 65) == "imagenet"
    assert resolve_constants("cifar", 224, 224) == "cifar"
    images = synthetic_images(2, 32)
    np.testing.assert_array_equal(corrupt(images, "contrast", 3, seed=0),
                                  corrupt(images, "contrast", 3, seed=0, constants="cifar"))


# --------------------------------------------------------------------------- reference package
# Our mean absolute change over the reference's (imagecorruptions-imaug, ImageNet-C constants),
# on the same synthetic images, with independent random numbers.  Tolerances come from measuring
# the ratio over 4 seeds x 4 images x severities 1/3/5 at 128 px (extremes): gaussian/shot noise
# and the deterministic corruptions [0.98, 1.04] (brightness s1 is ~3% high because we round where
# the reference truncates); impulse, glass, motion, snow, fog, elastic [0.93, 1.14]; frost
# [0.67, 1.56] with 4 images, because the texture drawn per image dominates -- hence 24 images at
# 64 px for frost, where the measured range is [0.85, 1.08].
TOLERANCE = {name: (0.93, 1.07) for name in CORRUPTIONS}
TOLERANCE.update({name: (0.85, 1.18) for name in
                  ("impulse_noise", "glass_blur", "motion_blur", "snow", "fog",
                   "elastic_transform")})
TOLERANCE["frost"] = (0.75, 1.33)
REFERENCE_SEEDED = {"impulse_noise", "glass_blur"}  # take seed=; the rest use np.random


@pytest.fixture(scope="module")
def reference():
    return pytest.importorskip("imagecorruptions")


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_agrees_with_reference(reference, name: str) -> None:
    images = synthetic_images(24, 64, seed=3) if name == "frost" else synthetic_images(4, 128)
    for severity in (1, 3, 5):
        ours = corrupt(images, name, severity, seed=severity, constants="imagenet")
        np.random.seed(severity)
        kwargs = {"seed": severity} if name in REFERENCE_SEEDED else {}
        ref = np.stack([reference.corrupt(im, severity=severity, corruption_name=name, **kwargs)
                        for im in images])
        ratio = mean_abs_change(ours, images) / mean_abs_change(ref, images)
        lo, hi = TOLERANCE[name]
        assert lo <= ratio <= hi, f"{name} s{severity}: ratio {ratio:.3f} not in [{lo}, {hi}]"


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_ones_match_reference_pixelwise(reference, name: str) -> None:
    # Only rounding differs (we round, the reference truncates): at most one grey level.
    images = synthetic_images(2, 96, seed=4)
    for severity in (1, 5):
        ours = corrupt(images, name, severity, seed=0, constants="imagenet").astype(int)
        ref = np.stack([reference.corrupt(im, severity=severity, corruption_name=name)
                        for im in images]).astype(int)
        assert np.abs(ours - ref).max() <= 1


@pytest.mark.parametrize("size", [40, 160])  # small: tap-by-tap gathers; large: FFT path
def test_motion_blur_taps_match_reference(reference, size: int) -> None:
    # Same angle -> same kernel and shifts as the reference's _motion_blur, to float precision.
    ref_blur = getattr(reference.corruptions, "_motion_blur", None)
    if ref_blur is None:
        pytest.skip("reference has no _motion_blur helper")
    from core.corruptions import _motion_blur

    images = synthetic_images(3, size, seed=2)[:, :, : size - 7].astype(np.float32)
    angles = np.array([-30.0, 12.5, 44.0])
    for radius, sigma in ((10, 3), (20, 15)):
        ours = _motion_blur(images, radius, sigma, angles)
        ref = np.stack([ref_blur(im.astype(np.float64), radius, sigma, a)
                        for im, a in zip(images, angles)])
        assert np.abs(ours - ref).max() < 1e-2
