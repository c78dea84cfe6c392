"""Model registry: built-in small nets and any timm model, all split into features / classifier.

FRAug needs the split (it augments the embedding ``u = features(x)`` that feeds the last Linear),
CEMA needs normalization layers, and the edge needs an ONNX-exportable graph. Every model this
registry returns is a :class:`SplitModel`: ``forward(x) == classifier(features(x))``.

Names: the built-ins below (``list_models()``), or ``"timm:<any timm name>"``. Nothing is ever
downloaded: timm models are created with ``pretrained=False``; a user's own weights come from a
local file through :func:`load_weights`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

ModelFactory = Callable[..., "SplitModel"]
_BUILTINS: dict[str, ModelFactory] = {}


class SplitModel(nn.Module):
    """A feature extractor followed by a linear classifier."""

    def __init__(self, features: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    @property
    def embedding_dim(self) -> int:
        return self.classifier.in_features

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a built-in factory ``f(num_classes, in_chans, image_size, **kw) -> SplitModel``."""

    def deco(fn: ModelFactory) -> ModelFactory:
        if name in _BUILTINS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILTINS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Names of the built-in models (timm names are accepted too, as ``timm:<name>``)."""
    return sorted(_BUILTINS)


def create_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    image_size: int = 32,
    weights: str | Path | None = None,
    **kwargs: object,
) -> SplitModel:
    """Build a registered model (or ``timm:<name>``), optionally loading a local weights file."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name.startswith("timm:"):
        model = _create_timm(name[5:], num_classes, in_chans, image_size, **kwargs)
    elif name in _BUILTINS:
        model = _BUILTINS[name](num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)
    else:
        raise ValueError(
            f"unknown model {name!r}; built-ins: {', '.join(list_models())}; or 'timm:<name>'"
        )
    if weights is not None:
        load_weights(model, weights)
    return model


# --------------------------------------------------------------------------------------------
# Built-ins


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("digits_cnn")
def digits_cnn(
    num_classes: int, in_chans: int = 3, image_size: int = 32, width: float = 1.0, embed_dim: int = 512
) -> SplitModel:
    """The FedBN / FRAug digits CNN: conv5×5 64-64-128 with BN, fc 2048 → 512 with BN.

    ``width`` scales every layer (0.25 is a quick CPU variant); the flattened size follows the
    input size, as in the paper's 28 px model.
    """
    c1, c2, c3 = (max(4, round(c * width)) for c in (64, 64, 128))
    f1, f2 = max(8, round(2048 * width)), max(8, round(embed_dim * width))
    side = image_size // 4
    features = nn.Sequential(
        *_conv_bn(in_chans, c1, 5), nn.MaxPool2d(2),
        *_conv_bn(c1, c2, 5), nn.MaxPool2d(2),
        *_conv_bn(c2, c3, 5),
        nn.Flatten(),
        nn.Linear(c3 * side * side, f1, bias=False), nn.BatchNorm1d(f1), nn.ReLU(inplace=True),
        nn.Linear(f1, f2, bias=False), nn.BatchNorm1d(f2), nn.ReLU(inplace=True),
    )
    return SplitModel(features, nn.Linear(f2, num_classes))


@register("edge_cnn")
def edge_cnn(num_classes: int, in_chans: int = 3, image_size: int = 32, width: int = 32) -> SplitModel:
    """A small BN CNN for forward-only edge devices (≈ 61k parameters at the default width)."""
    w = width
    features = nn.Sequential(
        *_conv_bn(in_chans, w // 2, 3), nn.MaxPool2d(2),
        *_conv_bn(w // 2, w, 3), nn.MaxPool2d(2),
        *_conv_bn(w, 2 * w, 3), nn.MaxPool2d(2),
        *_conv_bn(2 * w, 2 * w, 3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return SplitModel(features, nn.Linear(2 * w, num_classes))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register("teacher_resnet")
def teacher_resnet(
    num_classes: int, in_chans: int = 3, image_size: int = 32, width: int = 32, blocks: int = 2
) -> SplitModel:
    """A small-input ResNet (3 stages, ``blocks`` basic blocks each): the built-in cloud teacher.

    At the default width it has ≈ 0.7M parameters — wider and deeper than ``edge_cnn``, which is
    the gap CEMA's distillation relies on.
    """
    layers: list[nn.Module] = [*_conv_bn(in_chans, width, 3)]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for b in range(blocks):
            layers.append(_BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return SplitModel(nn.Sequential(*layers), nn.Linear(cin, num_classes))


# --------------------------------------------------------------------------------------------
# timm


class _TimmFeatures(nn.Module):
    """timm's ``forward_features`` + pooled ``forward_head(pre_logits=True)``: the embedding u."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def _create_timm(
    name: str, num_classes: int, in_chans: int, image_size: int, small_input: bool | None = None, **kwargs: object
) -> SplitModel:
    """Wrap a timm model (no pretrained weights) as a SplitModel.

    ``small_input`` (default: on for images ≤ 64 px) replaces a ResNet-style 7×7/2 stem + max-pool
    with a 3×3/1 stem, the CIFAR convention, so 32 px inputs keep their resolution.
    """
    import timm

    if not timm.list_models(name):
        raise ValueError(f"unknown timm model {name!r}")
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if small_input is None:
        small_input = image_size <= 64
    if small_input:
        _small_stem(net, in_chans)
    head = net.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"timm model {name!r} has a {type(head).__name__} head; a Linear classifier is required")
    # The classifier is applied by SplitModel; timm's own head must stop at the pooled embedding.
    net.reset_classifier(0)
    return SplitModel(_TimmFeatures(net), head)


def _small_stem(net: nn.Module, in_chans: int) -> None:
    conv1 = getattr(net, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and conv1.kernel_size[0] >= 5:
        net.conv1 = nn.Conv2d(in_chans, conv1.out_channels, 3, 1, 1, bias=False)
        if isinstance(getattr(net, "maxpool", None), nn.Module):
            net.maxpool = nn.Identity()
    else:
        log.info("small_input: %s has no ResNet-style stem; left unchanged", type(net).__name__)


# --------------------------------------------------------------------------------------------
# Weights


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict (``.pt``/``.pth``/``.bin``) or ``.safetensors`` file, strictly.

    Accepts a bare state dict or a checkpoint dict holding one under ``"state_dict"``/``"model"``.
    A mismatch raises ``ValueError`` listing the missing, unexpected and mis-shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            for key in ("state_dict", "model"):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(v[:8])}{' …' if len(v) > 8 else ''}"
                 for label, v in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if v]
        raise ValueError(f"{path} does not match the model — " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
