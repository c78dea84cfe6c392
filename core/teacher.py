"""The built-in models for standalone cloud-edge runs: a robust teacher and a plain edge model.

CEMA's distillation transfers the teacher's robustness, so the built-in teacher (``teacher_resnet``)
is trained on the training splits of every client of a built-in benchmark (digits-shift or
glyph-shift, :class:`core.data.builtin.BuiltinData`) with corruption augmentation — random noise /
blur / contrast corruptions at random severities 1–5, drawn from a seed stream disjoint from the
evaluation streams, plus colour jitter — while the default edge model (``edge_cnn``) is trained
on the same data without either, like a model shipped without any thought of shift. The other
nine corruption families are never seen by either model in training: the robustness report
covers seen and unseen families alike.

Training goes through the project's one training loop (:func:`core.training.train_local`), one
epoch per call: the augmentation is applied to a fresh copy of the training images before each
epoch, and the SGD momentum is carried from call to call. Trained weights are cached on disk
(``$FEDSHIFT_CACHE`` or ``~/.cache/fedshift``), keyed by a hash of the training config, so the
first run trains for a couple of minutes and later runs load a file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.corruptions import CORRUPTIONS, corrupt, corruption_constants, corruption_seed, resolve_constants
from core.data import FederatedDataset, Split
from core.data.builtin import BuiltinData
from core.data.cache import CACHE_ENV, cache_dir, file_lock  # noqa: F401  (re-exported)
from core.models import SplitModel, create_model, load_weights
from core.training import LocalSpec, evaluate, to_tensor, train_local

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when training code changes in a way the config does not capture
# noise / blur / contrast families (METHODS.md pilot); the other 9 test corruptions stay unseen
AUGMENT_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "contrast",
)
EVAL_SEED = 2024  # corruption seed of the robustness report; training draws from other streams


@dataclass(frozen=True)
class SupervisedConfig:
    """Everything that determines a trained built-in model (its hash names the cache file)."""

    model: str = "teacher_resnet"
    model_kwargs: tuple[tuple[str, int | float], ...] = ()  # e.g. (("width", 8),) for tests
    data: BuiltinData = BuiltinData()  # which built-in benchmark, how many classes and images
    image_size: int = 32
    data_seed: int = 0  # the dataset's seed (which images are train/val/test)
    epochs: int = 30
    steps_per_epoch: int = 0  # > 0: cap each epoch (tests)
    batch_size: int = 64
    lr: float = 0.05  # cosine-decayed per epoch to 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: tuple[str, ...] = ()  # corruptions used as augmentation; () = none
    augment_fraction: float = 0.75  # share of each epoch's images that are corrupted
    augment_chunk: int = 16  # images sharing one (corruption, severity) draw
    colour_jitter: float = 0.0  # per-image channel gain/offset spread (0: none); a quarter turn grey
    seed: int = 0  # init, shuffling and augmentation

    def __post_init__(self) -> None:
        unknown = [c for c in self.augment if c not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown augmentation corruptions {unknown}; valid: {', '.join(CORRUPTIONS)}")
        if self.epochs < 1 or self.batch_size < 2 or self.augment_chunk < 1:
            raise ValueError("epochs >= 1, batch_size >= 2 and augment_chunk >= 1 are required")
        if not 0.0 <= self.augment_fraction <= 1.0:
            raise ValueError(f"augment_fraction must be in [0, 1], got {self.augment_fraction}")
        if not 0.0 <= self.colour_jitter < 1.0:
            raise ValueError(f"colour_jitter must be in [0, 1), got {self.colour_jitter}")

    @property
    def num_classes(self) -> int:
        return self.data.classes
    def key(self) -> str:
        """Stable hash of the config (and the cache format): the cache file's name."""
        # the augmentation's constants too: retuned corruptions must not reuse a stale teacher
        kind = resolve_constants("auto", self.image_size, self.image_size)
        constants = {c: [corruption_constants(c, s, kind) for s in range(1, 6)] for c in self.augment}
        text = json.dumps({"format": CACHE_FORMAT, **asdict(self), "augment_constants": constants},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def create(self) -> SplitModel:
        """An untrained model of this config (seeded init, caller's RNG state untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return create_model(self.model, self.num_classes, image_size=self.image_size,
                                **dict(self.model_kwargs))


DEFAULT_TEACHER = SupervisedConfig(model="teacher_resnet", epochs=30, augment=AUGMENT_CORRUPTIONS)
DEFAULT_EDGE = SupervisedConfig(model="edge_cnn", epochs=40, augment=())
# glyph-shift has ~10x the images of digits-shift and up to 100 classes: fewer epochs, and colour
# jitter on top of the corruptions. The teacher keeps the registry's default width (0.7M
# parameters, 10x the edge model), so that a cloud given only its weights file rebuilds it.
GLYPH_TEACHER = SupervisedConfig(model="teacher_resnet", data=BuiltinData("glyph-shift", 10), epochs=20,
                                 augment=AUGMENT_CORRUPTIONS, colour_jitter=0.3)
GLYPH_EDGE = SupervisedConfig(model="edge_cnn", data=BuiltinData("glyph-shift", 10), epochs=20)


def builtin_config(role: str, data: BuiltinData, *, image_size: int = 32, data_seed: int = 0,
                   **changes: object) -> SupervisedConfig:
    """The built-in ``"edge"`` or ``"teacher"`` model's training config for a dataset."""
    if role not in ("edge", "teacher"):
        raise ValueError(f"role must be 'edge' or 'teacher', got {role!r}")
    base = {("edge", "digits-shift"): DEFAULT_EDGE, ("teacher", "digits-shift"): DEFAULT_TEACHER,
            ("edge", "glyph-shift"): GLYPH_EDGE, ("teacher", "glyph-shift"): GLYPH_TEACHER}[(role, data.dataset)]
    return replace(base, data=data, image_size=image_size, data_seed=data_seed, **changes)


# --------------------------------------------------------------------------------------------
# Training


def training_split(dataset: FederatedDataset) -> Split:
    """The training splits of all clients, concatenated."""
    return Split(np.concatenate([c.train.images for c in dataset.clients]),
                 np.concatenate([c.train.labels for c in dataset.clients]))


def eval_split(dataset: FederatedDataset, split: str = "test") -> Split:
    """One split of all clients, concatenated: ``test`` (the robustness report's and the adapt
    streams' data) or ``val`` (for picking settings without touching the test images)."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    parts = [getattr(c, split) for c in dataset.clients]
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def augment_images(images: np.ndarray, corruptions: Sequence[str], fraction: float, chunk: int,
                   rng: np.random.Generator) -> np.ndarray:
    """A copy of ``images`` where a random ``fraction`` is corrupted, in chunks of ``chunk`` images
    sharing one random corruption (from ``corruptions``) at one random severity 1–5."""
    out = images.copy()
    if not corruptions or fraction <= 0:
        return out
    order = rng.permutation(len(images))[: int(round(fraction * len(images)))]
    for start in range(0, len(order), chunk):
        idx = np.sort(order[start:start + chunk])
        name = corruptions[int(rng.integers(len(corruptions)))]
        out[idx] = corrupt(images[idx], name, int(rng.integers(1, 6)), seed=rng)
    return out


def colour_jitter(images: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Per-image random channel gains and offsets (±``spread``); a quarter of the images greyed.
    Colour is the one thing the domains vary that no corruption touches."""
    if spread <= 0:
        return images
    n = len(images)
    x = images.astype(np.float32) / 255.0
    gain = 1.0 + rng.uniform(-spread, spread, (n, 1, 1, 3)).astype(np.float32)
    offset = rng.uniform(-spread / 2, spread / 2, (n, 1, 1, 3)).astype(np.float32)
    x = x * gain + offset
    grey = rng.random(n) < 0.25
    x[grey] = x[grey].mean(axis=3, keepdims=True)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def train_supervised(config: SupervisedConfig, dataset: FederatedDataset | None = None) -> tuple[SplitModel, dict]:
    """Train a built-in model from scratch; returns it (eval mode) and a summary dict."""
    if dataset is None:
        dataset = config.data.make(config.data_seed, config.image_size)
    train = training_split(dataset)
    model = config.create()
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    aug_rng = corruption_seed(config.seed, "fedshift-train-augment")
    opt_state: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    result = None
    for epoch in range(config.epochs):
        lr = 0.5 * config.lr * (1 + math.cos(math.pi * epoch / config.epochs))
        spec = LocalSpec(epochs=1, steps=config.steps_per_epoch, batch_size=config.batch_size, lr=lr,
                         momentum=config.momentum, weight_decay=config.weight_decay)
        images = augment_images(colour_jitter(train.images, config.colour_jitter, aug_rng), config.augment,
                                config.augment_fraction, config.augment_chunk, aug_rng)
        result = train_local(model, Split(images, train.labels), spec, rng=rng, optimizer_state_in=opt_state)
        opt_state = result.optimizer_state
        log.info("%s epoch %d/%d: lr %.4f loss %.4f train acc %.3f (%.0f s)", config.model, epoch + 1,
                 config.epochs, lr, result.loss, result.accuracy, time.perf_counter() - start)
    model.eval()
    summary = {"config": asdict(config), "train_seconds": round(time.perf_counter() - start, 2),
               "train_loss": result.loss if result else None, "train_accuracy": result.accuracy if result else None,
               "train_samples": len(train)}
    return model, summary


def cached_model(config: SupervisedConfig, cache: str | os.PathLike | None = None) -> tuple[SplitModel, Path]:
    """Load the trained model of ``config`` from the cache, training (and caching) it if missing."""
    root = cache_dir(cache)
    path = root / f"{config.model}-{config.key()}.pt"
    with file_lock(root / f".{path.name}.lock"):
        if not path.is_file():
            log.info("training %s (not cached at %s); this takes a few minutes once", config.model, path)
            model, summary = train_supervised(config)
            tmp = path.with_suffix(".pt.tmp")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
            path.with_suffix(".json").write_text(json.dumps(summary, indent=2))
            log.info("cached %s at %s (%.0f s)", config.model, path, summary["train_seconds"])
    model = config.create()
    load_weights(model, path)
    return model.eval(), path


def model_or_builtin(name: str, weights: str | os.PathLike | None, builtin: SupervisedConfig,
                     cache: str | os.PathLike | None = None, *, num_classes: int = 10, image_size: int = 32,
                     in_chans: int = 3) -> tuple[SplitModel, Path]:
    """The registry model ``name`` with the user's ``weights``; without weights, the built-in
    ``builtin`` (trained once, cached) — only where it fits the request. Returns the weights path."""
    if weights:
        model = create_model(name, num_classes, image_size=image_size, in_chans=in_chans, weights=weights)
        return model.eval(), Path(weights)
    if name != builtin.model:
        raise ValueError(f"{name} has no built-in weights: pass its weights file")
    if (num_classes, image_size, in_chans) != (builtin.num_classes, builtin.image_size, 3):
        raise ValueError(f"the built-in {builtin.model} is for {builtin.num_classes} classes at "
                         f"{builtin.image_size} px RGB; pass its weights file")
    return cached_model(builtin, cache)


def default_teacher(cache: str | os.PathLike | None = None) -> tuple[SplitModel, Path]:
    """The built-in robust teacher (``teacher_resnet`` with corruption augmentation)."""
    return cached_model(DEFAULT_TEACHER, cache)


def default_edge_model(cache: str | os.PathLike | None = None) -> tuple[SplitModel, Path]:
    """The built-in edge model (``edge_cnn``, no corruption augmentation)."""
    return cached_model(DEFAULT_EDGE, cache)


# --------------------------------------------------------------------------------------------
# Robustness report


@torch.no_grad()
def batch_stats_accuracy(model: torch.nn.Module, split: Split, batch_size: int = 64, seed: int = 0) -> float:
    """Accuracy when every BN layer normalizes with the statistics of the batch being predicted
    (the forward-only "BN statistics" adaptation). Batches are a seeded shuffle of the split;
    the model itself is not modified."""
    probe = copy.deepcopy(model).train()
    order = np.random.default_rng(seed).permutation(len(split))
    correct = 0
    # near-equal batches, so none is a single sample (BatchNorm cannot normalize one)
    with torch.no_grad():
        for idx in np.array_split(order, max(1, math.ceil(len(order) / batch_size))):
            correct += int((probe(to_tensor(split.images[idx])).argmax(1).numpy() == split.labels[idx]).sum())
    return correct / len(split)


def batch_stats_predictions(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Predicted classes of uint8 images in stream order, in consecutive batches of ``batch_size``
    (as an edge forms them), BN normalizing with each batch's statistics; the model is not modified.
    The ``oracle`` selection's reference: the teacher run offline on the stream."""
    probe = copy.deepcopy(model).train()
    out = []
    with torch.no_grad():
        for lo in range(0, len(images), batch_size):
            chunk = images[lo:lo + batch_size]
            if len(chunk) == 1:  # BatchNorm cannot normalize one sample: take it with its predecessors
                chunk = images[max(0, lo - batch_size + 1):lo + 1]
                out.append(probe(to_tensor(chunk)).argmax(1).numpy()[-1:])
                continue
            out.append(probe(to_tensor(chunk)).argmax(1).numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def robustness_report(model: torch.nn.Module, split: Split, *, severity: int = 5,
                      corruptions: Sequence[str] = CORRUPTIONS, seed: int = EVAL_SEED,
                      batch_size: int = 64) -> dict:
    """Clean and corrupted accuracy, each with running BN statistics ("eval", no adaptation) and
    with batch statistics ("batch_stats"); per corruption at ``severity`` and their mean."""
    model.eval()
    report: dict = {"severity": severity, "seed": seed, "samples": len(split),
                    "clean": {"eval": evaluate(model, split)[1], "batch_stats": batch_stats_accuracy(model, split, batch_size)},
                    "corrupted": {}}
    for name in corruptions:
        shifted = Split(corrupt(split.images, name, severity, seed=seed), split.labels)
        report["corrupted"][name] = {"eval": evaluate(model, shifted)[1],
                                     "batch_stats": batch_stats_accuracy(model, shifted, batch_size)}
    for mode in ("eval", "batch_stats"):
        values = [v[mode] for v in report["corrupted"].values()]
        report[f"corrupted_mean_{mode}"] = float(np.mean(values)) if values else float("nan")
    return report
