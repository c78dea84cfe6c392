"""FRAug (Chen et al., ICCV 2023): federated representation augmentation, per METHODS.md.

A shared generator G (held and averaged by the server) makes client-agnostic embeddings
``v̂ = G(z, y)``; each client's local RTNet turns them into client-specific residuals that are
added to an anchor (a real embedding, or a class prototype), and the synthetic embeddings train
the classifier head. One local step = (1) model step on real + synthetic CE, (2) generator step,
(3) RTNet step — :class:`FRAugHook` plugs these into the shared loop of core/training.py.

Because a published pilot found the augmentation acting as label noise, the hook also measures
*label consistency*: the share of synthetic embeddings the current head assigns to their label.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.fraug_config import FRAugSettings  # noqa: F401 - re-exported: the hook takes it
from core.models import SplitModel
from core.training import make_sgd, optimizer_state


def _onehot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(y, num_classes).to(torch.float32)


class Generator(nn.Module):
    """G: ``[z, onehot(y)]`` → Linear(d_z+C → d)–BN–ReLU–Linear(d → d)–BN–ReLU → ``v̂``."""

    def __init__(self, embedding_dim: int, num_classes: int, latent_dim: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.latent_dim = latent_dim or max(1, embedding_dim // 2)
        d = embedding_dim
        self.net = nn.Sequential(
            nn.Linear(self.latent_dim + num_classes, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
            nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
        )

    def sample_z(self, n: int, noise: str, generator: torch.Generator) -> torch.Tensor:
        shape = (n, self.latent_dim)
        if noise == "normal":
            return torch.randn(shape, generator=generator)
        return torch.rand(shape, generator=generator)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, _onehot(y, self.num_classes)], 1))


def make_generator(seed: int, embedding_dim: int, num_classes: int, latent_dim: int = 0) -> Generator:
    """The initial global G, identical wherever it is built (the global torch RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return Generator(embedding_dim, num_classes, latent_dim)


class RTNet(nn.Module):
    """T: ``[v̂, onehot(y)]`` → Linear(d+C → d_z)–BN–ReLU–Linear(d_z → d)[–BN] → residual r.

    ``forward`` returns ``anchor + r``. ``final_bn=False`` drops the decoder's last BatchNorm,
    which otherwise makes the residual as large as the embedding (METHODS.md's diagnosis).
    """

    def __init__(self, embedding_dim: int, num_classes: int, latent_dim: int = 0, final_bn: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        d, dz = embedding_dim, latent_dim or max(1, embedding_dim // 2)
        decoder: list[nn.Module] = [nn.Linear(dz, d)]
        if final_bn:
            decoder.append(nn.BatchNorm1d(d))
        self.net = nn.Sequential(nn.Linear(d + num_classes, dz), nn.BatchNorm1d(dz), nn.ReLU(inplace=True),
                                 *decoder)

    def residual(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([v, _onehot(y, self.num_classes)], 1))

    def forward(self, v: torch.Tensor, anchor: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return anchor + self.residual(v, y)


def update_prototypes(protos: torch.Tensor, u: torch.Tensor, y: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA of class-mean embeddings, only for classes present in the batch (μ ← (1−m)μ + m·mean)."""
    onehot = _onehot(y, protos.shape[0])
    count = onehot.sum(0).unsqueeze(1)
    means = onehot.T @ u.detach() / count.clamp_min(1.0)
    m = (count > 0).to(protos.dtype) * momentum
    return protos * (1 - m) + means * m


def mmd_gaussian(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Multi-kernel Gaussian MMD² (5 bandwidths around the mean pairwise distance, ×2 apart)."""
    total = torch.cat([x, y], 0)
    n = total.shape[0]
    d2 = torch.cdist(total, total).pow(2)
    bandwidth = d2.detach().sum() / max(n * n - n, 1)
    bandwidth = bandwidth.clamp_min(1e-8) / kernel_mul ** (kernel_num // 2)
    kernels = sum(torch.exp(-d2 / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))
    b = x.shape[0]
    return kernels[:b, :b].mean() + kernels[b:, b:].mean() - kernels[:b, b:].mean() - kernels[b:, :b].mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax."""
    return -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()


def ramp(server_round: int, total_rounds: int, gamma: float) -> float:
    """``exp(γ(t − T))`` — FRAug's ramp, used for λ_t and the interpolation ratio ρ."""
    return math.exp(gamma * (server_round - total_rounds))


def lambda_schedule(server_round: int, total_rounds: int, gamma: float, lambda_max: float = 0.5,
                    warmup_rounds: int = 0) -> float:
    """λ_t = min(λ_max, exp(γ(t − T))); 0 during warm-up (rounds ≤ ``warmup_rounds``)."""
    if server_round <= warmup_rounds:
        return 0.0
    return min(lambda_max, ramp(server_round, total_rounds, gamma))


def cyclic_labels(batch: int, num_classes: int, offset: int) -> torch.Tensor:
    """Class-balanced labels ``offset, offset+1, …`` (mod C), rotating each step."""
    return (torch.arange(batch) + offset) % num_classes


class FRAugHook:
    """FRAug's three local updates, plugged into :func:`core.training.train_local`.

    Holds this round's G (received from the server), the client's RTNet and prototypes (restored
    from Context.state) and their optimizers; after the round the caller reads them back.
    """

    def __init__(
        self,
        settings: FRAugSettings,
        generator: Generator,
        rtnet: RTNet,
        prototypes: torch.Tensor,
        *,
        server_round: int,
        total_rounds: int,
        seed: int,
        optimizer_states: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        self.s = settings
        self.G = generator
        self.T = rtnet
        self.protos = prototypes.clone()
        self.num_classes = prototypes.shape[0]
        self.round = server_round
        self.lam = lambda_schedule(server_round, total_rounds, settings.gamma, settings.lambda_max,
                                   settings.warmup_rounds)
        self.rho = ramp(server_round, total_rounds, settings.gamma) if settings.interpolate else 1.0
        self.active = server_round > settings.warmup_rounds
        self.rng = torch.Generator().manual_seed(seed)
        states = optimizer_states or {}
        self._g_params = dict(self.G.named_parameters())
        self._t_params = dict(self.T.named_parameters())
        self.opt_g = make_sgd(self._g_params, settings.lr_aux, settings.momentum_aux, state=states.get("generator"))
        self.opt_t = make_sgd(self._t_params, settings.lr_aux, settings.momentum_aux, state=states.get("rtnet"))
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._label_offset = 0

    # ------------------------------------------------------------------ bookkeeping
    def _log(self, **values: float) -> None:
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
            self._counts[k] = self._counts.get(k, 0) + 1

    def metrics(self) -> dict[str, float]:
        keys = ("lambda", "ce_real", "ce_synthetic", "label_consistency_real", "label_consistency_proto",
                "g_ce", "g_dist", "t_entropy", "t_dist", "residual_ratio")
        out = {k: self._sums.get(k, 0.0) / max(self._counts.get(k, 0), 1) for k in keys}
        out["lambda"] = self.lam
        return out

    def optimizer_states(self) -> dict[str, dict[str, np.ndarray]]:
        return {"generator": optimizer_state(self.opt_g, self._g_params),
                "rtnet": optimizer_state(self.opt_t, self._t_params)}

    def _next_labels(self, batch: int) -> torch.Tensor:
        y = cyclic_labels(batch, self.num_classes, self._label_offset)
        self._label_offset = (self._label_offset + batch) % self.num_classes
        return y

    def _synthetic(self, anchor: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """û = anchor + T(G(z, y), y), optionally interpolated toward the anchor (no grad to G)."""
        with torch.no_grad():
            v = self.G(self.G.sample_z(len(y), self.s.noise, self.rng), y)
        u_hat = self.T(v, anchor, y)
        if self.s.interpolate:
            u_hat = self.rho * u_hat + (1 - self.rho) * anchor
        return u_hat

    # ------------------------------------------------------------------ the three updates
    def model_loss(self, model: SplitModel, u: torch.Tensor, y: torch.Tensor, ce: torch.Tensor,
                   step: int) -> torch.Tensor:
        """(1) L = (1−λ)·CE(h(u), y) + λ·½[CE(h(û_c), y_c) + CE(h(û), y)]; û without grad."""
        self.protos = update_prototypes(self.protos, u, y, self.s.proto_momentum)
        self._log(ce_real=ce.detach())
        if not self.active:
            return ce
        self.G.eval()
        self.T.eval()
        y_c = self._next_labels(len(y))
        with torch.no_grad():
            u_hat = self._synthetic(u.detach(), y)
            u_hat_c = self._synthetic(self.protos[y_c], y_c)
            r = u_hat - u.detach()
            self._log(residual_ratio=r.norm(dim=1).mean() / u.detach().norm(dim=1).mean().clamp_min(1e-8))
        logits_hat, logits_hat_c = model.classifier(u_hat), model.classifier(u_hat_c)
        ce_syn = 0.5 * (F.cross_entropy(logits_hat_c, y_c) + F.cross_entropy(logits_hat, y))
        self._log(
            ce_synthetic=ce_syn.detach(),
            label_consistency_real=(logits_hat.argmax(1) == y).float().mean(),
            label_consistency_proto=(logits_hat_c.argmax(1) == y_c).float().mean(),
        )
        return (1 - self.lam) * ce + self.lam * ce_syn

    def after_step(self, model: SplitModel, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        """(2) generator step, then (3) RTNet step, both with the model frozen in eval mode."""
        if not self.active:
            return
        model.eval()
        with torch.no_grad():
            u_real = model.features(x)
        head = model.classifier
        # (2) L_G = CE(h(G(z, y_c)), y_c) − λ_G·D_G
        self.G.train()
        y_c = self._next_labels(len(y))
        v = self.G(self.G.sample_z(len(y), self.s.noise, self.rng), y_c)
        g_ce = F.cross_entropy(head(v), y_c)
        if self.s.g_distance == "mse":
            g_dist = F.mse_loss(v, self.protos[y_c])
        else:
            g_dist = mmd_gaussian(v, u_real)
        self.opt_g.zero_grad(set_to_none=True)
        (g_ce - self.s.lambda_g * g_dist).backward()
        self.opt_g.step()
        self.G.eval()
        # (3) L_T = mean over both branches of [−H(h(û)) + λ_T·MMD(û, anchor)]
        self.T.train()
        with torch.no_grad():
            z = self.G.sample_z(len(y), self.s.noise, self.rng)
            v_c, v_r = self.G(z, y_c), self.G(self.G.sample_z(len(y), self.s.noise, self.rng), y)
        anchor_c = self.protos[y_c]
        u_c, u_r = self.T(v_c, anchor_c, y_c), self.T(v_r, u_real, y)
        t_ent = 0.5 * (entropy(head(u_c)) + entropy(head(u_r)))
        t_dist = 0.5 * (mmd_gaussian(u_c, anchor_c) + mmd_gaussian(u_r, u_real))
        self.opt_t.zero_grad(set_to_none=True)
        (-t_ent + self.s.lambda_t * t_dist).backward()
        self.opt_t.step()
        self.T.eval()
        model.zero_grad(set_to_none=True)
        self._log(g_ce=g_ce.detach(), g_dist=g_dist.detach(), t_entropy=t_ent.detach(), t_dist=t_dist.detach())
