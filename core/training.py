"""The one local training loop every strategy uses (FedAvg, FedProx, FedBN, local-only, FRAug).

A strategy changes *what* is shared, not how a client trains: FedProx adds a proximal term against
the received global weights, FRAug plugs in a :class:`LocalHook` that reshapes the loss and runs
its generator / RTNet updates after each model step. Images arrive as the data splits hold them
(uint8 NHWC) and are normalised exactly as the exported ONNX model expects
(:class:`protos.contract.Preprocess`, whose numpy math the edge runs), so a model trained here is
deployed without a second convention.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.augment import augment_batch
from core.data.types import Split
from core.models import SplitModel
from protos.contract import Preprocess

log = logging.getLogger(__name__)

_PREPROCESS = Preprocess()


def to_unit(images: np.ndarray, preprocess: Preprocess = _PREPROCESS) -> torch.Tensor:
    """uint8 NHWC images → float32 NCHW ``x/scale`` (what an augmentation works on)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32)
    return x.div_(preprocess.scale)


def normalize(x: torch.Tensor, preprocess: Preprocess = _PREPROCESS) -> torch.Tensor:
    """``(x - mean)/std`` of :func:`to_unit`'s output."""
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


def to_tensor(images: np.ndarray, preprocess: Preprocess = _PREPROCESS) -> torch.Tensor:
    """uint8 NHWC images → float32 NCHW ``(x/scale - mean)/std``: ``preprocess(images)`` in torch,
    so training batches stay on torch's fast path."""
    return normalize(to_unit(images, preprocess), preprocess)


@dataclass(frozen=True)
class LocalSpec:
    """How much and how a client trains in one round."""

    epochs: int = 1
    steps: int = 0  # > 0: exactly this many minibatch steps (cycling epochs), overrides epochs
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.5
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    augment: str = "none"  # "crop-colour": core/augment.py on every batch (the authors' family)

    def __post_init__(self) -> None:
        if self.augment not in ("none", "crop-colour"):
            raise ValueError(f"augment must be none or crop-colour, got {self.augment!r}")


class LocalHook(Protocol):
    """Extension points of the loop (FRAug implements them; see core/fraug.py)."""

    def model_loss(self, model: SplitModel, u: torch.Tensor, y: torch.Tensor, ce: torch.Tensor,
                   step: int) -> torch.Tensor:
        """The model's loss given embeddings ``u`` (with grad) and the plain CE on them."""

    def after_step(self, model: SplitModel, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        """Runs after each model optimizer step (auxiliary networks' updates)."""

    def metrics(self) -> dict[str, float]:
        """Per-round means of whatever the hook measured."""


@dataclass
class TrainResult:
    """What one round of local training produced."""

    loss: float
    accuracy: float
    steps: int
    num_examples: int
    optimizer_state: dict[str, np.ndarray] = field(repr=False)
    metrics: dict[str, float] = field(default_factory=dict)


def minibatches(n: int, batch_size: int, rng: np.random.Generator, *, epochs: int = 1,
                steps: int = 0) -> Iterator[np.ndarray]:
    """Index batches over ``n`` samples: ``epochs`` shuffled passes, or exactly ``steps`` batches.

    A trailing batch of one sample is dropped: BatchNorm cannot train on it.
    """
    if n < 2:
        raise ValueError(f"need at least 2 training samples, got {n}")

    def one_pass() -> Iterator[np.ndarray]:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) >= 2:
                yield idx

    if steps > 0:
        produced = 0
        while produced < steps:
            for idx in one_pass():
                yield idx
                produced += 1
                if produced == steps:
                    return
    else:
        for _ in range(epochs):
            yield from one_pass()


def proximal_term(model: nn.Module, global_params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """FedProx's ``½‖w − w_global‖²`` over the parameters named in ``global_params``.

    (The caller multiplies by μ.) Zero exactly at the global weights.
    """
    terms = [(p - global_params[name].detach()).pow(2).sum()
             for name, p in model.named_parameters() if name in global_params]
    if not terms:
        return torch.zeros(())
    return 0.5 * torch.stack(terms).sum()


def optimizer_state(optimizer: torch.optim.Optimizer, named: Mapping[str, nn.Parameter]) -> dict[str, np.ndarray]:
    """SGD momentum buffers by parameter name (to persist them in a client's Context.state)."""
    out: dict[str, np.ndarray] = {}
    for name, p in named.items():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf.detach().cpu().numpy().copy()
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, named: Mapping[str, nn.Parameter],
                         state: Mapping[str, np.ndarray]) -> None:
    """Inverse of :func:`optimizer_state`; names absent from ``state`` start without momentum."""
    for name, p in named.items():
        if name in state:
            buf = torch.from_numpy(np.array(state[name], dtype=np.float32)).to(p.dtype)
            if tuple(buf.shape) != tuple(p.shape):
                raise ValueError(f"momentum buffer {name}: shape {tuple(buf.shape)} vs parameter {tuple(p.shape)}")
            optimizer.state[p] = {"momentum_buffer": buf}


def make_sgd(params: Mapping[str, nn.Parameter], lr: float, momentum: float, weight_decay: float = 0.0,
             state: Mapping[str, np.ndarray] | None = None) -> torch.optim.SGD:
    """SGD over named parameters, restoring momentum buffers when given."""
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if state:
        load_optimizer_state(opt, params, state)
    return opt


def train_local(
    model: SplitModel,
    split: Split,
    spec: LocalSpec,
    *,
    rng: np.random.Generator,
    global_params: Mapping[str, torch.Tensor] | None = None,
    hook: LocalHook | None = None,
    optimizer_state_in: Mapping[str, np.ndarray] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``split`` for one round; return losses and optimizer state.

    ``global_params`` (required when ``spec.proximal_mu > 0``) are the weights received this round.
    """
    if spec.proximal_mu > 0 and global_params is None:
        raise ValueError("proximal_mu > 0 needs the global parameters")
    unit_all = to_unit(split.images)
    x_all = normalize(unit_all)
    y_all = torch.from_numpy(split.labels)
    aug_rng = np.random.default_rng(rng.integers(2**63)) if spec.augment != "none" else None
    named = dict(model.named_parameters())
    opt = make_sgd(named, spec.lr, spec.momentum, spec.weight_decay, optimizer_state_in)
    model.train()
    total_loss = total_correct = total_seen = steps = 0
    for idx in minibatches(len(split), spec.batch_size, rng, epochs=spec.epochs, steps=spec.steps):
        x = x_all[idx] if aug_rng is None else normalize(augment_batch(unit_all[idx], aug_rng))
        y = y_all[idx]
        u = model.features(x)
        logits = model.classifier(u)
        ce = F.cross_entropy(logits, y)
        loss = hook.model_loss(model, u, y, ce, steps) if hook is not None else ce
        if spec.proximal_mu > 0:
            loss = loss + spec.proximal_mu * proximal_term(model, global_params or {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hook is not None:
            hook.after_step(model, x, y, steps)
            model.train()
        total_loss += float(ce.detach()) * len(idx)
        total_correct += int((logits.argmax(1) == y).sum())
        total_seen += len(idx)
        steps += 1
    return TrainResult(
        loss=total_loss / max(total_seen, 1),
        accuracy=total_correct / max(total_seen, 1),
        steps=steps,
        num_examples=len(split),
        optimizer_state=optimizer_state(opt, named),
        metrics=hook.metrics() if hook is not None else {},
    )


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 256) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` in eval mode on ``split``."""
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    model.eval()
    total_loss = correct = 0.0
    for start in range(0, len(split), batch_size):
        x = to_tensor(split.images[start:start + batch_size])
        y = torch.from_numpy(split.labels[start:start + batch_size])
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return total_loss / len(split), correct / len(split)
