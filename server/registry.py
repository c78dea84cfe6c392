"""The cloud's registry of edges: who is registered, on which learner, which sequence numbers and
episode each is at, and the counters the stats report. No gRPC here: the service asks, and turns
a refusal into a status for the caller.

One lock guards everything below (it is a leaf: nothing else is taken while it is held). The
rules an upload goes through, in order (:meth:`EdgeRegistry.admit`): a sequence number seen
before is a *duplicate* (answered, not counted again); an episode the edge has not started is
*future* (refused: Reset first); an older episode is *stale* (acknowledged and recorded, so a
retry is a duplicate, but not learned from); the rest is *accepted*.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

from server.edges import EdgeRecord, LearnerSlot
from server.stats import EdgeStats
from server.validation import metric_values


class EdgeRegistry:
    """The registered edges and the cloud's upload and publication totals (thread-safe)."""

    def __init__(self, max_edges: int) -> None:
        self.max_edges = max_edges
        self._lock = threading.Lock()
        self._edges: dict[str, EdgeRecord] = {}
        self._uploads = self._samples = self._versions = 0

    # ---------------------------------------------------------------- edges

    def get(self, edge_id: str) -> EdgeRecord | None:
        with self._lock:
            return self._edges.get(edge_id)

    def require(self, edge_id: str) -> EdgeRecord:
        """The edge, or KeyError (replaying a journal: an edge registers before it uploads)."""
        edge = self.get(edge_id)
        if edge is None:
            raise KeyError(f"edge {edge_id!r} is not registered")
        return edge

    def is_full_for(self, edge_id: str) -> bool:
        """True when ``edge_id`` is new and ``max_edges`` are registered already (check and
        :meth:`add` under the service's journal lock, as Register does: one registration at a time)."""
        with self._lock:
            return edge_id not in self._edges and len(self._edges) >= self.max_edges

    def add(self, edge: EdgeRecord) -> None:
        with self._lock:
            self._edges[edge.edge_id] = edge

    def set_model(self, edge: EdgeRecord, model_id: str, model_sha256: str) -> None:
        with self._lock:
            edge.model_id, edge.model_sha256 = model_id, model_sha256

    def __len__(self) -> int:
        with self._lock:
            return len(self._edges)

    def slots(self) -> list[LearnerSlot]:
        """The learners of the registered edges, each once, in registration order."""
        with self._lock:
            return list({id(e.slot): e.slot for e in self._edges.values()}.values())

    # ---------------------------------------------------------------- uploads

    def next_sequence(self, edge: EdgeRecord) -> int:
        with self._lock:
            return edge.sequences.next

    def check_duplicate(self, edge: EdgeRecord, sequence: int) -> bool:
        """Whether ``sequence`` was seen before (counted as a duplicate if so)."""
        with self._lock:
            duplicate = sequence in edge.sequences
            if duplicate:
                edge.duplicates += 1
            return duplicate

    def admit(self, edge: EdgeRecord, sequence: int, episode: int) -> tuple[str, int]:
        """``duplicate``, ``future``, ``stale`` or ``accepted`` (the module's rules), and the edge's episode."""
        with self._lock:
            current = edge.episode
            if sequence in edge.sequences:
                return "duplicate", current
        if episode > current:
            return "future", current
        return ("stale" if episode < current else "accepted"), current

    def record(self, edge: EdgeRecord, outcome: str, sequence: int, seen: int, samples: int) -> bool:
        """Count an admitted upload; True when its samples go to the learner (``accepted``)."""
        with self._lock:
            if outcome == "duplicate":
                edge.duplicates += 1
            if outcome not in ("stale", "accepted"):
                return False
            edge.sequences.add(sequence)
            edge.seen = max(edge.seen, seen)
            if outcome == "stale":
                edge.stale_samples += samples
                return False
            edge.uploads += 1
            edge.samples += samples
            self._uploads += 1
            self._samples += samples
            return True

    # ---------------------------------------------------------------- episodes, metrics, versions

    def episode(self, edge: EdgeRecord) -> int:
        with self._lock:
            return edge.episode

    def set_episode(self, edge: EdgeRecord, episode: int) -> None:
        with self._lock:
            edge.episode = episode

    def report_metrics(self, edge: EdgeRecord, values: Mapping[str, float]) -> dict[str, float]:
        """Keep an edge's reported metrics (:func:`server.validation.metric_values`; ValueError if refused)."""
        with self._lock:  # the check and the update at once: the name limit counts what the edge has
            checked = metric_values(values, edge.metrics)
            edge.metrics.update(checked)
            return checked

    def count_publication(self) -> None:
        with self._lock:
            self._versions += 1

    def totals(self) -> tuple[int, int, int]:
        """Versions published, uploads accepted and their samples, since the cloud's first start."""
        with self._lock:
            return self._versions, self._uploads, self._samples

    def stats(self) -> tuple[dict[str, EdgeStats], dict[str, int]]:
        """Each edge's counters and the totals, read at one instant (CloudStats checks that the
        edges' uploads and samples add up to the totals)."""
        with self._lock:
            edges = {e.edge_id: EdgeStats(uploads=e.uploads, samples=e.samples, duplicates=e.duplicates,
                                          stale_samples=e.stale_samples, seen=e.seen, episode=e.episode,
                                          learner=e.slot.name, metrics=dict(e.metrics))
                     for e in self._edges.values()}
            return edges, {"versions_published": self._versions, "uploads": self._uploads, "samples": self._samples}

    # ---------------------------------------------------------------- checkpoint

    def state(self) -> dict[str, Any]:
        """The registry as plain values (the snapshot's ``edges``, ``totals`` and ``versions``)."""
        with self._lock:
            return {"edges": [e.state() for e in self._edges.values()],
                    "totals": {"uploads": self._uploads, "samples": self._samples}, "versions": self._versions}

    def load(self, state: Mapping[str, Any], slots: Mapping[str, LearnerSlot]) -> None:
        """Replace the registry with a snapshot's (``slots`` by name, already restored)."""
        with self._lock:
            self._edges = {s["edge_id"]: EdgeRecord.from_state(s, slots[s["slot"]]) for s in state["edges"]}
            self._uploads, self._samples = int(state["totals"]["uploads"]), int(state["totals"]["samples"])
            self._versions = int(state["versions"])
