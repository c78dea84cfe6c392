"""Edge-side sample selection for cloud-edge adaptation (CEMA, METHODS.md "Edge sample selection").

Why on the edge: the upload count is CEMA's communication metric, so each edge decides from its own
forward pass which samples are worth sending. All rules use the softmax entropy of the edge model,
``H(x) = -sum_c p_c log p_c`` with ``C`` classes and ``E0 = e0_factor * ln C`` (0.4 ln C):

(a) unreliable exclusion -- keep if ``H < E_max``. During a warm-up of the first ``N_w`` samples
    ``E_max = E0``; afterwards ``E_max = lam * E0 * mean_t / mean_w`` where ``mean_t`` is the
    running mean entropy of *all* predictions so far and ``mean_w`` that mean over the first
    ``N_w`` samples, frozen. The threshold shrinks as the edge becomes confident.
(b) low-informative exclusion -- keep if ``H > E_min = kappa * ln C``.
(c) redundancy (EATA) -- a moving average ``m`` of the softmax of kept samples,
    ``m <- 0.9 m + 0.1 mean(p of kept)``; the first batch with survivors of (a)+(b) initialises
    ``m`` and keeps them all; afterwards keep a sample if ``cos(m, p) < d``. ``d=None`` turns it off.

Granularity (our choice, the papers are per batch): one threshold per batch. A batch is in warm-up
when fewer than ``N_w`` samples were seen *before* it; ``mean_t`` includes the current batch (it has
been predicted before selection: predict first, adapt after); ``mean_w`` is the exact mean of the
first ``N_w`` entropies, whatever the batch size. The rules apply in the order (a), (b), (c) and
each sample is counted under the first rule that excludes it.

Methods: ``cema`` as above (``dynamic=False`` = static ``E0``; ``use_emin=False`` = no floor);
``cema_released`` = the authors' released configuration: static ``E0`` (warm-up disabled), no
floor, redundancy on with ``d`` scaled to C classes (:func:`scaled_redundancy` when
``redundancy`` is unset) -- as released, that is the rule of ``eata``, kept under its own name so
that a result says which setting was meant; ``eata`` = static ``H < E0`` + redundancy (``d``
scaled the same way when unset), no floor;
``all`` keeps everything (cloud-Tent, distill-all); ``none`` uploads nothing; ``random`` keeps each
sample with probability ``random_rate`` from a seeded generator (the matched-rate baseline);
``oracle`` (benchmarks only) keeps a sample where the edge's prediction differs from a reference
label -- the teacher's prediction, computed offline and stored in the stream -- which bounds what any
rule that picks samples by their usefulness can gain.

Budget (``budget`` = a target upload rate, for ``cema``, ``cema_released`` and ``eata``): each
batch's ``E_max`` is set so that the episode's uploads so far are ``round(budget * seen)``: the
quota is filled with the batch's lowest entropies -- for ``cema`` the lowest *above its floor*
``E_min`` -- so each rule keeps its own ranking and both upload the same number of samples.
Redundancy is off under a budget (it would move the rate off target). A quota rather than a
quantile of past entropies: an adapting edge's entropies drift down, and a quantile of the past
then overshoots its target (measured: 15% for a 5% budget on a drifting stream).

Episodes: :meth:`EntropySelector.reset` forgets the thresholds' state (running and warm-up means,
the redundancy average, the budget's quota counts) -- the edge calls it at every episode of the reset
protocol, as the authors rebuild both filters per corruption, and never in the continual one.
Running entropy statistics are kept for every method so that reports are comparable; after a
reset they cover the current episode. State lives in each selector (no globals).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from protos.config import option
from protos.contract import E0_FACTOR, entropy_margin

METHODS = ("cema", "cema_released", "eata", "all", "none", "random", "oracle")
BUDGETED = ("cema", "cema_released", "eata")  # methods whose thresholds a budget can set
STATIC = ("cema_released", "eata")  # static E_max = E0, redundancy scaled to C when unset


def scaled_redundancy(num_classes: int) -> float:
    """EATA's redundancy threshold scaled to C classes: its d = 0.05 for 1000 classes sits ~1.6x
    above cos(onehot, uniform) = 1/sqrt(C) ≈ 0.032; the same ratio gives 0.5 for C = 10 and 0.16
    for C = 100. A scaling argument, not tuned."""
    return 0.5 * math.sqrt(10 / num_classes)


@dataclass(frozen=True)
class SelectionConfig:
    """Constants of the edge selection; defaults are METHODS.md's."""

    num_classes: int = option(0, "classes of the model (0: read from the model file)")
    method: str = option("cema", "which samples to upload: " + ", ".join(METHODS), choices=METHODS)
    lam: float = option(1.0, "λ of the dynamic E_max")
    warmup: int = option(128, "N_w: samples judged with E_max = E0 before the threshold adapts")
    kappa: float = option(0.02, "E_min = κ·ln C (low-informative floor)")
    e0_factor: float = option(E0_FACTOR, "E0 = factor·ln C (EATA's reliability threshold)")
    redundancy: float | None = option(None, "EATA redundancy: keep if cos(m, p) < D (none: off)")
    redundancy_momentum: float = option(0.9, "momentum of the redundancy filter's moving average")
    dynamic: bool = option(True, "dynamic E_max (false: E_max = E0 throughout, an ablation)")
    use_emin: bool = option(True, "the low-informative floor E_min (false: none, an ablation)", flag="emin")
    random_rate: float | None = option(None, "keep probability of method 'random'")
    budget: float | None = option(None, "target upload rate: thresholds of cema / cema_released / eata are set "
                                  "to hit it (none: the rules' own thresholds)")
    seed: int = option(0, "seed of method 'random'", flag="selection-seed")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown selection method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.num_classes != 0 and self.num_classes < 2:
            raise ValueError(f"selection needs at least 2 classes, got {self.num_classes}")
        if self.lam <= 0 or self.e0_factor <= 0:
            raise ValueError(f"lam and e0_factor must be positive (got {self.lam}, {self.e0_factor})")
        if self.warmup < 0 or self.kappa < 0:
            raise ValueError(f"warmup and kappa must be >= 0 (got {self.warmup}, {self.kappa})")
        if self.redundancy is not None and not math.isfinite(self.redundancy):
            raise ValueError(f"redundancy threshold must be finite or None, got {self.redundancy}")
        if not 0.0 <= self.redundancy_momentum < 1.0:
            raise ValueError(f"redundancy_momentum must be in [0, 1), got {self.redundancy_momentum}")
        if self.method == "random":
            if self.random_rate is None or not 0.0 <= self.random_rate <= 1.0:
                raise ValueError(f"method 'random' needs random_rate in [0, 1], got {self.random_rate}")
        if self.budget is not None:
            if self.method not in BUDGETED:
                raise ValueError(f"budget applies to {', '.join(BUDGETED)}, not {self.method!r}")
            if not 0.0 < self.budget <= 1.0:
                raise ValueError(f"budget must be in (0, 1], got {self.budget}")

    def for_classes(self, num_classes: int) -> "SelectionConfig":
        """This config for a model with ``num_classes`` outputs (``num_classes = 0``: take it)."""
        if self.num_classes not in (0, num_classes):
            raise ValueError(f"selection is set for {self.num_classes} classes, the model has {num_classes}")
        resolved = replace(self, num_classes=num_classes)
        if self.redundancy is None and resolved.redundancy_threshold is not None:
            resolved = replace(resolved, redundancy=resolved.redundancy_threshold)  # the d in force, recorded
        return resolved

    @property
    def e0(self) -> float:
        """``E0 = e0_factor * ln C``: EATA's static reliability threshold (the cloud's weights use the same)."""
        return entropy_margin(self.e0_factor, self.num_classes)

    @property
    def e_min(self) -> float:
        """``E_min = kappa * ln C``: the low-informative floor."""
        return self.kappa * math.log(self.num_classes)

    @property
    def uses_floor(self) -> bool:
        """Whether rule (b) applies (``cema`` with its floor on)."""
        return self.method == "cema" and self.use_emin

    @property
    def redundancy_threshold(self) -> float | None:
        """The redundancy ``d`` in force (``None``: off): ``eata`` and ``cema_released`` scale it to C
        when unset (:func:`scaled_redundancy`); ``cema`` keeps it off unless set; a budget turns it
        off."""
        if self.budget is not None:
            return None
        if self.method in STATIC and self.redundancy is None:
            return scaled_redundancy(self.num_classes)
        return self.redundancy

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Selection:
    """What :meth:`EntropySelector.select` decided for one batch.

    ``e_max`` / ``e_min`` are the thresholds used (``None`` where the method has none);
    ``unreliable + low_informative + redundant + skipped + kept == len(mask)``.
    """

    mask: np.ndarray  # bool (N,)
    entropies: np.ndarray  # float32 (N,)
    e_max: float | None
    e_min: float | None
    unreliable: int = 0  # H >= E_max
    low_informative: int = 0  # H <= E_min
    redundant: int = 0  # cos(m, p) >= d
    skipped: int = 0  # excluded by the method itself ("none", or not drawn by "random")
    mean_entropy: float = float("nan")  # running mean over all predictions, this batch included

    @property
    def kept(self) -> int:
        return int(self.mask.sum())

    @property
    def size(self) -> int:
        return int(self.mask.size)


def softmax_entropy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and entropies ``-sum p log p`` (nats), computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, classes), got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    return p, -(p * log_p).sum(axis=1)


@dataclass
class _Running:
    """Running entropy statistics shared by every method (the dynamic threshold reads them)."""

    seen: int = 0
    total: float = 0.0
    warm_total: float = 0.0
    warm_mean: float | None = None  # frozen once ``warmup`` samples were seen

    @property
    def mean(self) -> float:
        return self.total / self.seen if self.seen else float("nan")

    def add(self, entropies: np.ndarray, warmup: int) -> None:
        if self.warm_mean is None and entropies.size:
            take = max(0, min(warmup - self.seen, entropies.size))
            self.warm_total += float(entropies[:take].sum())
            if self.seen + entropies.size >= warmup:
                # warmup == 0: the reference mean is the first batch's
                self.warm_mean = self.warm_total / warmup if warmup else float(entropies.mean())
        self.seen += int(entropies.size)
        self.total += float(entropies.sum())


@dataclass
class EntropySelector:
    """Stateful per-edge selector: feed it each batch's logits in stream order."""

    config: SelectionConfig
    _stats: _Running = field(default_factory=_Running, init=False, repr=False)
    _m: np.ndarray | None = field(default=None, init=False, repr=False)
    _quota_seen: int = field(default=0, init=False, repr=False)  # the budget's episode counts
    _quota_kept: int = field(default=0, init=False, repr=False)
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.config.num_classes < 2:
            raise ValueError("the selector needs the model's class count: use config.for_classes(n)")
        self._rng = np.random.default_rng(self.config.seed)

    @property
    def seen(self) -> int:
        return self._stats.seen

    @property
    def mean_entropy(self) -> float:
        return self._stats.mean

    @property
    def warmup_mean(self) -> float | None:
        return self._stats.warm_mean

    @property
    def moving_probs(self) -> np.ndarray | None:
        """The redundancy filter's moving average of kept softmax vectors (a copy)."""
        return None if self._m is None else self._m.copy()

    def reset(self) -> None:
        """Start a new episode: forget the running and warm-up means, the redundancy average and the
        budget's quota counts (the seeded generator of ``random`` runs on)."""
        self._stats = _Running()
        self._m = None
        self._quota_seen = self._quota_kept = 0

    def select(self, logits: np.ndarray, reference: np.ndarray | None = None) -> Selection:
        """Decide which samples of this batch to upload; updates the running state.

        ``reference`` (method ``oracle`` only): a reference label per sample, e.g. the teacher's
        prediction; a sample is kept where the edge's argmax differs from it."""
        cfg = self.config
        p, h = softmax_entropy(logits)
        if p.shape[1] != cfg.num_classes:
            raise ValueError(f"logits have {p.shape[1]} classes, the selector was built for {cfg.num_classes}")
        in_warmup = self._stats.seen < cfg.warmup
        self._stats.add(h, cfg.warmup)
        mean = self._stats.mean
        n = h.size
        ent = h.astype(np.float32)
        if cfg.method == "oracle":
            if reference is None or np.shape(reference) != (n,):
                raise ValueError("method 'oracle' needs one reference label per sample (a stream with 'reference')")
            mask = p.argmax(axis=1) != np.asarray(reference)
            return Selection(mask, ent, None, None, skipped=int(n - mask.sum()), mean_entropy=mean)
        if cfg.method == "all":
            return Selection(np.ones(n, bool), ent, None, None, mean_entropy=mean)
        if cfg.method == "none":
            return Selection(np.zeros(n, bool), ent, None, None, skipped=n, mean_entropy=mean)
        if cfg.method == "random":
            mask = self._rng.random(n) < cfg.random_rate
            return Selection(mask, ent, None, None, skipped=int(n - mask.sum()), mean_entropy=mean)
        return self._filter(p, h, ent, in_warmup, mean)

    def _filter(self, p: np.ndarray, h: np.ndarray, ent: np.ndarray, in_warmup: bool, mean: float) -> Selection:
        """Rules (a), (b), (c) for ``cema`` / ``cema_released`` / ``eata``."""
        cfg = self.config
        e_min = cfg.e_min if cfg.uses_floor else None
        e_max = self._budget_e_max(h, e_min) if cfg.budget is not None else self._e_max(in_warmup, mean)
        reliable = h < e_max
        informative = h > e_min if e_min is not None else np.ones_like(reliable)
        candidates = reliable & informative
        mask, redundant = self._redundancy(p, candidates)
        return Selection(
            mask=mask, entropies=ent, e_max=e_max, e_min=e_min,
            unreliable=int((~reliable).sum()),
            low_informative=int((reliable & ~informative).sum()),
            redundant=redundant, mean_entropy=mean,
        )

    def _budget_e_max(self, h: np.ndarray, e_min: float | None) -> float:
        """``E_max`` for this batch that brings the episode's upload rate to ``budget``: the quota
        ``round(budget * seen) - kept`` is filled with this batch's lowest entropies (above the
        floor, if any); ``H < E_max`` then keeps exactly them (ties aside)."""
        self._quota_seen += h.size
        quota = int(round(self.config.budget * self._quota_seen)) - self._quota_kept
        eligible = np.sort(h[h > e_min] if e_min is not None else h)
        k = max(0, min(quota, eligible.size))
        self._quota_kept += k
        if k == 0:
            return float(eligible[0]) if eligible.size else (e_min if e_min is not None else 0.0)
        return float(np.nextafter(eligible[k - 1], np.inf))

    def _e_max(self, in_warmup: bool, mean: float) -> float:
        cfg = self.config
        if cfg.method in STATIC or not cfg.dynamic or in_warmup:
            return cfg.e0
        warm = self._stats.warm_mean
        # a warm-up of exactly zero entropy leaves the ratio undefined: keep lam * E0 then
        ratio = mean / warm if warm is not None and warm > 1e-12 else 1.0
        return cfg.lam * cfg.e0 * ratio

    def _redundancy(self, p: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, int]:
        """EATA's filter: drop candidates too similar to the moving average of kept softmaxes."""
        d = self.config.redundancy_threshold
        if d is None:
            return candidates, 0
        idx = np.flatnonzero(candidates)
        if idx.size == 0:
            return candidates, 0
        if self._m is None:  # the first batch with survivors initialises m and keeps them all
            self._m = p[idx].mean(axis=0)
            return candidates, 0
        q = p[idx]
        cos = q @ self._m / (np.linalg.norm(q, axis=1) * np.linalg.norm(self._m) + 1e-12)
        keep = np.abs(cos) < d
        mask = np.zeros_like(candidates)
        mask[idx[keep]] = True
        if keep.any():
            mu = self.config.redundancy_momentum
            self._m = mu * self._m + (1.0 - mu) * q[keep].mean(axis=0)
        return mask, int((~keep).sum())
