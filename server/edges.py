"""The cloud's state of edges and learners: which sequence numbers an edge used, what a learner
published, what waits for a learner. Plain objects with their own (de)serialisation for the
checkpoint; the locks that guard them are named where each field is (an edge's counters:
:class:`server.registry.EdgeRegistry`'s).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from core.cema import CemaLearner
from protos.codec import encode_state
from protos.fedshift.v1 import edge_pb2 as pb

SHARED = "shared"  # the learner's name when one student serves every edge


class SequenceSet:
    """Which sequence numbers of one edge were accepted: a watermark (everything below was seen)
    plus the set seen above it; gaps older than ``max_gap_entries`` uploads are forgotten (treated
    as seen) so that memory stays bounded for edges that skip numbers."""

    max_gap_entries = 4096

    def __init__(self) -> None:
        self._low = 0
        self._above: set[int] = set()
        self._max = -1

    def __contains__(self, seq: int) -> bool:
        return seq < self._low or seq in self._above

    def add(self, seq: int) -> None:
        self._above.add(seq)
        self._max = max(self._max, seq)
        if len(self._above) > self.max_gap_entries:
            self._low = max(self._low, min(self._above))
        while self._low in self._above:
            self._above.discard(self._low)
            self._low += 1

    @property
    def next(self) -> int:
        """The number after the highest accepted one (where a restarted edge resumes)."""
        return self._max + 1

    def state(self) -> dict[str, Any]:
        return {"low": self._low, "above": sorted(self._above), "max": self._max}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "SequenceSet":
        seqs = cls()
        seqs._low, seqs._above, seqs._max = int(state["low"]), {int(v) for v in state["above"]}, int(state["max"])
        return seqs


class LearnerSlot:
    """One learner and what it published. ``lock`` serialises learner access (worker steps, Reset);
    ``cond`` guards the published fields and the watchers, which wake the Subscribe streams."""

    def __init__(self, name: str, learner: CemaLearner, template_sha256: str = "") -> None:
        self.name = name
        self.learner = learner
        self.template_sha256 = template_sha256  # the edge model file its student started from ("": the cloud's)
        self.lock = threading.Lock()
        self.cond = threading.Condition()
        self.watchers: set[Callable[[], None]] = set()  # Subscribe streams waiting for a newer version
        self.version = 0
        self.tensors: list[pb.Tensor] = encode_state(learner.norm_state())
        self.created_unix = time.time()
        self.steps = 0  # student steps over the slot's life (not reset by Reset)
        self.episode = 0
        self.errors = 0
        self.learned_samples = 0  # samples handed to the learner over the slot's life
        self.ceiling = 0  # with a journal: versions up to this one are reserved (server.checkpoint)

    def state(self, final: bool = False) -> dict[str, Any]:
        """Everything to rebuild this slot (caller holds ``lock``); ``final``: nothing will be
        published after it (shutdown), so the version itself is the ceiling."""
        with self.cond:
            version = self.version
        return {"version": version, "ceiling": version if final else max(self.ceiling, version), "steps": self.steps,
                "episode": self.episode, "errors": self.errors, "learned_samples": self.learned_samples,
                "template_sha256": self.template_sha256, "learner": self.learner.state_dict()}

    def load(self, state: Mapping[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.version, self.ceiling = int(state["version"]), int(state["ceiling"])
        self.steps, self.episode, self.errors = int(state["steps"]), int(state["episode"]), int(state["errors"])
        self.learned_samples = int(state["learned_samples"])
        self.tensors = encode_state(self.learner.norm_state())

    def watch(self, wake: Callable[[], None]) -> None:
        with self.cond:
            self.watchers.add(wake)

    def unwatch(self, wake: Callable[[], None]) -> None:
        with self.cond:
            self.watchers.discard(wake)

    def wake_watchers(self) -> None:
        """Tell every subscription a newer version (or the end) may be there (any thread)."""
        with self.cond:
            watchers = list(self.watchers)
        for wake in watchers:
            wake()

    def update(self) -> pb.ParameterUpdate:
        """The newest publication as a message (caller holds ``cond``)."""
        return pb.ParameterUpdate(version=self.version, tensors=self.tensors, created_unix=self.created_unix,
                                  cloud_step=self.steps, episode=self.episode)


@dataclass
class EdgeRecord:
    """One registered edge and its counters (guarded by :class:`server.registry.EdgeRegistry`'s lock)."""

    edge_id: str
    model_id: str
    model_sha256: str
    slot: LearnerSlot
    sequences: SequenceSet = field(default_factory=SequenceSet)
    episode: int = 0
    uploads: int = 0
    samples: int = 0
    duplicates: int = 0
    stale_samples: int = 0
    seen: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    _COUNTERS = ("episode", "uploads", "samples", "duplicates", "stale_samples", "seen")

    def state(self) -> dict[str, Any]:
        return {"edge_id": self.edge_id, "model_id": self.model_id, "model_sha256": self.model_sha256,
                "slot": self.slot.name, "sequences": self.sequences.state(), "metrics": dict(self.metrics),
                **{k: getattr(self, k) for k in self._COUNTERS}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], slot: LearnerSlot) -> "EdgeRecord":
        return cls(state["edge_id"], state["model_id"], state["model_sha256"], slot,
                   sequences=SequenceSet.from_state(state["sequences"]),
                   metrics={k: float(v) for k, v in state["metrics"].items()},
                   **{k: int(state[k]) for k in cls._COUNTERS})


@dataclass
class QueuedUpload:
    """Validated samples waiting for the worker."""

    slot: LearnerSlot
    edge_id: str
    episode: int
    images: torch.Tensor  # float NCHW, preprocessed
    labels: np.ndarray  # (N,) or (0,)
    done: threading.Event = field(default_factory=threading.Event)  # set when its learner went idle

    def state(self) -> dict[str, Any]:
        return {"slot": self.slot.name, "edge_id": self.edge_id, "episode": self.episode,
                "images": self.images.detach().cpu().clone(), "labels": torch.from_numpy(np.asarray(self.labels))}
