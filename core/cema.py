"""CEMA's cloud step: losses, the replay buffer and the learner that adapts teacher and student.

Everything here is plain torch — no sockets, no threads — so the gRPC service (``server/cloud.py``)
and offline experiments share one implementation. The formulas follow METHODS.md (CEMA section):

- EATA weights ``w = exp(E0 − sg[H])`` with ``E0 = e0_factor · ln C``;
- teacher step: ``mean(w_t · H(t))`` on norm-affine parameters, BN in train mode;
- student step: ``α·mean(w_s·H(s)) + β·mean(w_t·T²·KL(softmax(t/T) ‖ softmax(s/T)))
  + γ·mean(w_t·CE(s, argmax t))``, teacher in eval mode without gradients, student BN in train
  mode, norm-affine parameters only;
- batches of B uploads mixed with 3B replay samples once the replay holds ``replay_start``.

Why functions are small and separate: unit tests pin each formula on hand-made logits, and the
cloud-Tent baseline reuses :func:`softmax_entropy` alone.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.norm import configure_norm_adaptation, get_norm_state, load_norm_module_state, norm_module_state
from core.renorm import EDGE_NORMS, RUNNING_INITS, RenormBatchNorm, learning_mode, prepare_student, start_episode
from protos.config import option
from protos.contract import E0_FACTOR, entropy_margin

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("cema", "tent", "distill")
PRESETS: tuple[str, ...] = ("small", "authors")
# the authors' cloud constants (METHODS.md, conf/cema.conf) for 1000 classes and 50,000-sample streams
AUTHORS_CONSTANTS: dict[str, object] = {
    "batch_size": 32, "teacher_lr": 2.5e-4, "student_lr": 2.5e-3, "replay_capacity": 10_000,
    "replay_start": 256, "replay_at_upload": True,
}


# --------------------------------------------------------------------------------------------
# Losses


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy ``H = −Σ p log p`` of ``softmax(logits)`` (natural log), shape (N,)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def eata_weights(entropy: torch.Tensor, e0: float) -> torch.Tensor:
    """EATA's sample weights ``exp(E0 − sg[H])``: confident samples count more; no gradient."""
    return torch.exp(e0 - entropy.detach())


def teacher_loss(teacher_logits: torch.Tensor, e0: float) -> torch.Tensor:
    """The teacher's adaptation loss ``mean_i w_i · H(f(x_i))`` (EATA-weighted entropy)."""
    h = softmax_entropy(teacher_logits)
    return (eata_weights(h, e0) * h).mean()


class DistillLoss(NamedTuple):
    """The student loss and its three (unscaled, weighted-mean) terms, for logging and tests."""

    total: torch.Tensor
    entropy: torch.Tensor  # mean(w_s · H(s))
    kl: torch.Tensor  # mean(w_t · T² · KL(softmax(t/T) ‖ softmax(s/T)))
    ce: torch.Tensor  # mean(w_t · CE(s, argmax t))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    e0: float,
    alpha: float = 3.0,
    beta: float = 3.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> DistillLoss:
    """CEMA's student loss: weighted entropy + weighted T²·KL to the teacher + weighted CE to its
    argmax. ``w_s``/``w_t`` are EATA weights of the student's / teacher's entropy (at T = 1)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    t = teacher_logits.detach()
    h_s = softmax_entropy(student_logits)
    w_s = eata_weights(h_s, e0)
    w_t = eata_weights(softmax_entropy(t), e0)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature ** 2
    ce = F.cross_entropy(student_logits, t.argmax(dim=1), reduction="none")
    entropy_term = (w_s * h_s).mean()
    kl_term = (w_t * kl).mean()
    ce_term = (w_t * ce).mean()
    total = alpha * entropy_term + beta * kl_term + gamma * ce_term
    return DistillLoss(total, entropy_term, kl_term, ce_term)


# --------------------------------------------------------------------------------------------
# Replay


class ReplayBuffer:
    """FIFO buffer of the newest ``capacity`` samples with seeded uniform sampling.

    A preallocated ring (allocated on the first add, on the samples' device) so that adding and
    sampling cost no Python-level copies per sample.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.seed = int(seed)
        self._data: torch.Tensor | None = None
        self._next = 0  # ring position of the next write
        self._size = 0
        self._rng = np.random.default_rng(self.seed)

    def __len__(self) -> int:
        return self._size

    def add(self, samples: torch.Tensor) -> None:
        """Append a batch; the oldest samples beyond ``capacity`` are overwritten."""
        samples = samples.detach()
        if self._data is None:
            self._data = torch.empty((self.capacity, *samples.shape[1:]), dtype=samples.dtype,
                                     device=samples.device)
        elif samples.shape[1:] != self._data.shape[1:]:
            raise ValueError(f"replay holds {tuple(self._data.shape[1:])} samples, got {tuple(samples.shape[1:])}")
        if len(samples) > self.capacity:
            samples = samples[-self.capacity:]
        n = len(samples)
        idx = (self._next + torch.arange(n)) % self.capacity
        self._data[idx.to(self._data.device)] = samples.to(self._data.device)
        self._next = (self._next + n) % self.capacity
        self._size = min(self.capacity, self._size + n)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` samples drawn uniformly (without replacement when the buffer holds enough)."""
        if self._size == 0 or self._data is None:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = self._rng.choice(self._size, size=n, replace=n > self._size)
        return self._data[torch.from_numpy(self._order()[idx]).to(self._data.device)]

    def contents(self) -> torch.Tensor:
        """All held samples, oldest first (for inspection and tests)."""
        if self._data is None:
            return torch.empty(0)
        return self._data[torch.from_numpy(self._order()).to(self._data.device)]

    def _order(self) -> np.ndarray:
        start = (self._next - self._size) % self.capacity
        return (start + np.arange(self._size)) % self.capacity

    def clear(self) -> None:
        """Empty the buffer and restart its sampling stream (reset-per-shift)."""
        self._next = self._size = 0
        self._rng = np.random.default_rng(self.seed)

    def state_dict(self) -> dict:
        """The held samples (oldest first, on the CPU) and the sampling stream's state: loading it
        into a buffer of the same capacity makes it draw exactly what this one would."""
        return {"capacity": self.capacity, "samples": self.contents().cpu().clone(),
                "rng": copy.deepcopy(self._rng.bit_generator.state)}

    def load_state_dict(self, state: dict, device: str | torch.device = "cpu") -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"replay state holds capacity {state['capacity']}, this buffer {self.capacity}")
        samples = state["samples"]
        self._data = None
        self._next = self._size = 0
        if len(samples):
            self.add(samples.to(device))  # oldest first: the same logical order, from ring position 0
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])


# --------------------------------------------------------------------------------------------
# Learner


@dataclass(frozen=True)
class CemaConfig:
    """The cloud step's settings (small-scale analogue of METHODS.md; paper values in comments).

    ``method``: ``"cema"`` — teacher step + distillation step; ``"distill"`` — the same cloud step
    (the name records that the edges upload everything, the "distill all" baseline); ``"tent"`` —
    cloud-Tent: plain mean entropy of the student, no teacher at all.

    ``preset``: ``small`` keeps the small-scale constants below; ``authors`` puts the authors'
    (:data:`AUTHORS_CONSTANTS`) in place of every one still at its small-scale default, so a field
    set to another value wins (one set to exactly its small default cannot be told apart and takes
    the authors' value). ``edge_norm``/``running_init``: :mod:`core.renorm`.
    """

    method: str = option("cema", "cema/distill: teacher step + distillation; tent: entropy on the student alone",
                         choices=METHODS)
    preset: str = option("small", "constants: small (this machine's scale) or authors (B 32, lr 2.5e-4 / 2.5e-3, "
                         "replay 10,000 from 256, uploads replayed at upload time)", choices=PRESETS)
    edge_norm: str = option("batch", "how the edges normalize: batch (each batch's own statistics), running "
                            "(statistics the cloud estimates and sends, the authors'), source (frozen)",
                            choices=EDGE_NORMS)
    running_init: str = option("upload", "running edges: statistics start from the first uploaded batch of an "
                               "episode (upload, the authors') or from the source statistics", choices=RUNNING_INITS)
    batch_size: int = option(16, "uploaded samples per cloud step (paper: 32)")
    replay: bool = option(True, "mix replay samples into student batches (false: the uploads alone)")
    replay_capacity: int = option(2000, "replay buffer size (paper: 10,000)", flag="replay-size")
    replay_start: int = option(64, "replay samples needed before they are mixed in (paper: 256)")
    replay_ratio: int = option(3, "replay samples per upload in a student batch (3:1)")
    replay_at_upload: bool = option(False, "uploads enter the replay when they arrive (the authors'), not after "
                                    "their cloud step")
    teacher_adapt: bool = option(True, "adapt the teacher on the uploads (false: keep it fixed)")
    teacher_lr: float = option(1e-3, "teacher learning rate (paper: 2.5e-4)")
    student_lr: float = option(1e-2, "student learning rate (paper: 2.5e-3, 10x the teacher's)")
    momentum: float = option(0.9, "SGD momentum of both optimizers")
    alpha: float = option(3.0, "weight of the student's entropy term")
    beta: float = option(3.0, "weight of the KL-to-teacher term")
    gamma: float = option(1.0, "weight of the CE-to-teacher-argmax term")
    temperature: float = option(1.0, "distillation temperature")
    channels_last: bool = option(True, "run the cloud's convolutions in channels-last memory format (the "
                                 "same maths, faster on CPU: benchmarks/cloud_edge.py --only-learning)")
    e0_factor: float = option(E0_FACTOR, "E0 = factor·ln C in the EATA sample weights")
    seed: int = option(0, "seed of the learners (replay sampling)")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.edge_norm not in EDGE_NORMS or self.running_init not in RUNNING_INITS:
            raise ValueError(f"edge_norm must be one of {EDGE_NORMS} and running_init one of {RUNNING_INITS}, "
                             f"got {self.edge_norm!r}, {self.running_init!r}")
        if self.preset == "authors":  # resolved once, here: the object then holds the values in force
            small = CemaConfig()
            for key, value in AUTHORS_CONSTANTS.items():
                if getattr(self, key) == getattr(small, key):
                    object.__setattr__(self, key, value)
        for key in ("batch_size", "replay_capacity", "replay_start"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.replay_ratio < 0:
            raise ValueError(f"replay_ratio must be >= 0, got {self.replay_ratio}")
        for key in ("teacher_lr", "student_lr", "temperature"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    @property
    def uses_teacher(self) -> bool:
        return self.method != "tent"

    def e0(self, num_classes: int) -> float:
        """EATA's entropy margin ``E0 = e0_factor · ln C`` (the edge's reliability filter uses the same)."""
        return entropy_margin(self.e0_factor, num_classes)

    def to_dict(self) -> dict:
        return asdict(self)


class CemaLearner:
    """One student (the edge model's cloud copy) and its teacher, optimizers, replay and queue.

    Not thread-safe: the cloud service serialises access. Images arrive preprocessed (float NCHW,
    the export's convention). ``step()`` does one unit of work so the caller can publish the
    student's normalization state after every student step:

    - while the queue holds ≥ B samples: pop B → teacher step → student step on the B uploads plus
      ``replay_ratio``·B replay samples once the replay holds ``replay_start`` (the uploads alone
      before that); the B uploads then enter the replay (with ``replay_at_upload``: on arrival);
    - when samples were added but no batch formed since, and the replay is large enough: one
      student step on ``(1 + replay_ratio)``·B replay samples;
    - otherwise ``None``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config: CemaConfig, *,
                 num_classes: int, device: str | torch.device = "cpu") -> None:
        if config.uses_teacher and teacher is None:
            raise ValueError(f"method {config.method!r} needs a teacher model")
        self.config = config
        self.device = torch.device(device)
        self.num_classes = int(num_classes)
        self.e0 = config.e0(self.num_classes)
        self._format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.student = prepare_student(student, config.edge_norm, config.running_init).to(
            self.device, memory_format=self._format)
        self.teacher = (teacher.to(self.device, memory_format=self._format)
                        if (teacher is not None and config.uses_teacher) else None)
        self._initial_student = copy.deepcopy(self.student.state_dict())
        self._initial_teacher = copy.deepcopy(self.teacher.state_dict()) if self.teacher is not None else None
        self.replay = ReplayBuffer(config.replay_capacity, seed=config.seed)
        self._setup()

    def _setup(self) -> None:
        """Fresh optimizers, queue and counters over the current (initial) weights."""
        cfg = self.config
        self._student_params = configure_norm_adaptation(self.student)
        self.student_opt = torch.optim.SGD(self._student_params, lr=cfg.student_lr, momentum=cfg.momentum)
        self.teacher_opt: torch.optim.Optimizer | None = None
        if self.teacher is not None:
            params = configure_norm_adaptation(self.teacher)
            self.teacher_opt = torch.optim.SGD(params, lr=cfg.teacher_lr, momentum=cfg.momentum)
        self._queue: deque[tuple[torch.Tensor, int]] = deque()  # (image CHW, label or -1)
        self._added_since_batch = False
        self.student_steps = 0
        self.teacher_steps = 0

    # ---------------------------------------------------------------- input

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    def add(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray | None = None) -> None:
        """Queue preprocessed images (N, C, H, W). ``labels`` (optional) only feed monitoring
        (accuracy of the teacher and student on uploads); no loss ever sees them."""
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        if labels is not None and len(labels) not in (0, len(images)):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        images = images.detach().to(self.device, torch.float32)
        if self.config.replay and self.config.replay_at_upload and len(images):
            self.replay.add(images)
        label_list = [int(v) for v in labels] if labels is not None and len(labels) else [-1] * len(images)
        self._queue.extend(zip(images, label_list))
        if len(images):
            self._added_since_batch = True

    # ---------------------------------------------------------------- steps

    def step(self) -> dict[str, float] | None:
        """One teacher + student step (or one replay-only student step); ``None`` when idle."""
        cfg = self.config
        b = cfg.batch_size
        if len(self._queue) >= b:
            items = [self._queue.popleft() for _ in range(b)]
            uploads = torch.stack([x for x, _ in items])
            labels = torch.tensor([y for _, y in items], device=self.device)
            self._added_since_batch = False
            stats: dict[str, float] = {"uploads_in_batch": float(b)}
            if self.teacher is not None and cfg.teacher_adapt:
                stats.update(self.teacher_step(uploads))
            batch, batch_labels = uploads, labels
            if cfg.replay and len(self.replay) >= cfg.replay_start and cfg.replay_ratio > 0:
                batch = torch.cat([uploads, self.replay.sample(cfg.replay_ratio * b)])
                batch_labels = torch.cat([labels, torch.full((cfg.replay_ratio * b,), -1, device=self.device)])
            stats.update(self._student_step(batch, batch_labels))
            if cfg.replay and not cfg.replay_at_upload:
                self.replay.add(uploads)
            return stats
        if self._added_since_batch:
            self._added_since_batch = False
            return self.replay_step()
        return None

    def replay_step(self) -> dict[str, float] | None:
        """One student step on ``(1 + replay_ratio)``·B replay samples (``None``: replay off or too
        small); :meth:`step` runs one when samples arrived but no cloud batch formed."""
        cfg = self.config
        if not cfg.replay or len(self.replay) < cfg.replay_start:
            return None
        n = (1 + cfg.replay_ratio) * cfg.batch_size
        stats = {"uploads_in_batch": 0.0}
        stats.update(self._student_step(self.replay.sample(n), torch.full((n,), -1, device=self.device)))
        return stats

    def teacher_step(self, x: torch.Tensor) -> dict[str, float]:
        """One SGD step of the teacher's norm-affine parameters on ``x`` (EATA-weighted entropy)."""
        assert self.teacher is not None and self.teacher_opt is not None
        self.teacher.train()
        loss = teacher_loss(self.teacher(x.contiguous(memory_format=self._format)), self.e0)
        self.teacher_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.teacher_opt.step()
        self.teacher_steps += 1
        return {"teacher_loss": float(loss.detach())}

    def _student_step(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        cfg = self.config
        stats: dict[str, float] = {"batch_size": float(len(x))}
        x = x.contiguous(memory_format=self._format)
        teacher_logits = None
        if self.teacher is not None:
            self.teacher.eval()
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        learning_mode(self.student, cfg.edge_norm)
        logits = self.student(x)
        if teacher_logits is None:  # cloud-Tent: plain mean entropy
            loss = softmax_entropy(logits).mean()
            stats["student_loss"] = stats["entropy"] = float(loss.detach())
        else:
            terms = distillation_loss(logits, teacher_logits, e0=self.e0, alpha=cfg.alpha, beta=cfg.beta,
                                      gamma=cfg.gamma, temperature=cfg.temperature)
            loss = terms.total
            stats.update(student_loss=float(terms.total.detach()), entropy=float(terms.entropy.detach()),
                         kl=float(terms.kl.detach()), ce=float(terms.ce.detach()))
        self.student_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.student_opt.step()
        self.student_steps += 1
        known = labels >= 0
        if bool(known.any()):
            stats["student_acc_uploads"] = float((logits.argmax(1)[known] == labels[known]).float().mean())
            if teacher_logits is not None:
                stats["teacher_acc_uploads"] = float((teacher_logits.argmax(1)[known] == labels[known]).float().mean())
        return stats

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Everything :meth:`step` depends on, copied to the CPU: the adapted normalization layers of
        student and teacher (nothing else ever changes), both optimizers' momentum, the queue, the
        replay and its sampling stream, the counters. A learner built from the same templates and
        config that loads it continues exactly as this one would (a cloud checkpoint)."""
        images = (torch.stack([x for x, _ in self._queue]).cpu() if self._queue
                  else torch.empty((0,), dtype=torch.float32))
        return {
            "student": norm_module_state(self.student),
            "pending_init": [bool(m.pending_init) for m in self.student.modules() if isinstance(m, RenormBatchNorm)],
            "teacher": norm_module_state(self.teacher) if self.teacher is not None else None,
            "student_opt": _cpu_copy(self.student_opt.state_dict()),
            "teacher_opt": _cpu_copy(self.teacher_opt.state_dict()) if self.teacher_opt is not None else None,
            "queue_images": images, "queue_labels": torch.tensor([y for _, y in self._queue], dtype=torch.int64),
            "added_since_batch": self._added_since_batch,
            "student_steps": self.student_steps, "teacher_steps": self.teacher_steps,
            "replay": self.replay.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (the initial weights kept for :meth:`reset` stay this
        learner's own, i.e. its templates')."""
        if (state["teacher"] is None) != (self.teacher is None):
            raise ValueError("the learner state was saved with" + ("out" if state["teacher"] is None else "")
                             + " a teacher; this learner differs")
        load_norm_module_state(self.student, state["student"])
        renorms = [m for m in self.student.modules() if isinstance(m, RenormBatchNorm)]
        if len(renorms) != len(state["pending_init"]):
            raise ValueError("the learner state was saved under another edge normalization")
        for m, flag in zip(renorms, state["pending_init"]):
            m.pending_init = bool(flag)
        if self.teacher is not None:
            load_norm_module_state(self.teacher, state["teacher"])
        self._setup()  # fresh optimizers over the same parameters, then their saved momentum
        self.student_opt.load_state_dict(state["student_opt"])
        if self.teacher_opt is not None:
            self.teacher_opt.load_state_dict(state["teacher_opt"])
        images = state["queue_images"].to(self.device, torch.float32)
        self._queue.extend(zip(images, (int(v) for v in state["queue_labels"])))
        self._added_since_batch = bool(state["added_since_batch"])
        self.student_steps, self.teacher_steps = int(state["student_steps"]), int(state["teacher_steps"])
        self.replay.load_state_dict(state["replay"], self.device)

    def norm_state(self) -> dict[str, np.ndarray]:
        """The student's normalization state to publish: γ, β, running mean and var per layer."""
        return get_norm_state(self.student)

    def reset(self) -> None:
        """Restore the initial weights, fresh optimizers, empty queue and replay (new episode)."""
        self.student.load_state_dict(self._initial_student)
        if self.teacher is not None and self._initial_teacher is not None:
            self.teacher.load_state_dict(self._initial_teacher)
        self.replay.clear()
        if self.config.edge_norm == "running":
            start_episode(self.student, self.config.running_init)
        self._setup()


def _cpu_copy(obj):
    """A deep copy with every tensor moved to the CPU (optimizer states for a checkpoint)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)
