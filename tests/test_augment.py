"""Local image augmentation: seeded, in range, a real change, and wired into the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.augment import CropColour, augment_batch, crop_box
from core.data.types import Split
from core.models import create_model
from core.training import LocalSpec, train_local


def _images(n: int = 8, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_crop_boxes_stay_inside_and_cover_the_scale_range() -> None:
    spec, rng = CropColour(), np.random.default_rng(0)
    areas = []
    for _ in range(500):
        top, left, h, w = crop_box(16, 16, spec, rng)
        assert 0 <= top <= 16 - h and 0 <= left <= 16 - w and h > 0 and w > 0
        areas.append(h * w / 256)
    assert 0.4 <= min(areas) <= 0.6 and max(areas) > 0.9  # ~scale (0.5, 1), integer rounding aside


def test_augmentation_is_seeded_in_range_and_changes_images() -> None:
    x = _images()
    a = augment_batch(x, np.random.default_rng(1))
    b = augment_batch(x, np.random.default_rng(1))
    c = augment_batch(x, np.random.default_rng(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float((a - x).abs().mean()) > 0.02  # a real change, per image
    assert torch.equal(x, _images())  # the input is left alone
    grey = augment_batch(x, np.random.default_rng(3), CropColour(grayscale_p=1.0, hue=0.0))
    torch.testing.assert_close(grey[:, 0], grey[:, 1])
    torch.testing.assert_close(grey[:, 1], grey[:, 2])
    with pytest.raises(ValueError):
        CropColour(scale=(0.0, 1.0))


def _crops_only(**kw: float) -> CropColour:
    return CropColour(**{"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0, **kw})


def test_batched_ops_follow_torchvision() -> None:
    """The batched crop equals torchvision's resized_crop (bilinear, no antialias) inside the box,
    and brightness / contrast / saturation equal torchvision's adjust_* with the same factors."""
    from torchvision.transforms.v2 import functional as TF

    x = _images(6)
    spec = _crops_only()
    ours = augment_batch(x, np.random.default_rng(5), spec)
    boxes_rng = np.random.default_rng(5)
    for i in range(len(x)):
        top, left, h, w = crop_box(16, 16, spec, boxes_rng)
        ref = TF.resized_crop(x[i], top, left, h, w, [16, 16], antialias=False)
        torch.testing.assert_close(ours[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5, rtol=0)

    for key, op in (("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
                    ("saturation", TF.adjust_saturation)):
        spec = _crops_only(scale=(1.0, 1.0), ratio=(1.0, 1.0), **{key: 0.5})  # the full image: no crop
        ours = augment_batch(x, np.random.default_rng(7), spec)
        rng = np.random.default_rng(7)
        for i in range(len(x)):
            crop_box(16, 16, spec, rng)
        factors = rng.uniform(-1.0, 1.0, (len(x), 4))
        column = ("brightness", "contrast", "saturation").index(key)
        for i in range(len(x)):
            ref = op(x[i], 1 + 0.5 * float(factors[i, column]))
            torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0, msg=key)

    # the hue rotation: the identity at 0, grey pixels stay grey, colours move
    grey = x.mean(dim=1, keepdim=True).expand_as(x).contiguous()
    shifted = augment_batch(grey, np.random.default_rng(1), _crops_only(scale=(1.0, 1.0), ratio=(1.0, 1.0), hue=0.5))
    torch.testing.assert_close(shifted, grey, atol=1e-5, rtol=0)
    coloured = augment_batch(x, np.random.default_rng(1), _crops_only(scale=(1.0, 1.0), ratio=(1.0, 1.0), hue=0.5))
    assert float((coloured - x).abs().mean()) > 0.01


def test_training_with_augmentation_is_reproducible_and_differs_from_without() -> None:
    rng = np.random.default_rng(0)
    split = Split(images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), labels=rng.integers(0, 10, 40))

    def run(augment: str, seed: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = create_model("digits_cnn", 10, image_size=16, width=0.125)
        train_local(model, split, LocalSpec(steps=3, batch_size=8, augment=augment), rng=np.random.default_rng(seed))
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain, aug, again = run("none"), run("crop-colour"), run("crop-colour")
    assert all(torch.equal(aug[k], again[k]) for k in aug)
    assert any(not torch.equal(plain[k], aug[k]) for k in plain if plain[k].is_floating_point())
    with pytest.raises(ValueError, match="augment"):
        LocalSpec(augment="mixup")
