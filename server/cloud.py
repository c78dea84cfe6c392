"""The cloud side of cloud-edge adaptation: the ``EdgeService`` gRPC server running CEMA.

Edges register, upload the samples their entropy filters kept (uint8), subscribe to versioned
normalization-state updates and report metrics (``protos/fedshift/v1/edge.proto``). Here:

- RPC handlers only validate, deduplicate by ``(edge_id, sequence)`` and enqueue, so an upload is
  answered in milliseconds whatever the learner is doing;
- one worker thread moves queued samples into the learners (:class:`core.cema.CemaLearner`) and
  runs their steps; after every student step the student's normalization state becomes a new
  version, and the subscribers of that learner are woken (a condition variable per learner);
- ``per_edge`` (default) keeps one adapted student per edge (the paper's view of a deployment),
  ``shared`` one student for all edges;
- ``Reset(episode)`` restores a learner's initial state and publishes it as a new version
  (reset-per-shift protocol); samples of older episodes still in flight are counted as stale and
  dropped, never fed to the new episode;
- TensorBoard under ``out_dir/cloud``: losses, queue and replay sizes, step latency, version and
  upload rates, and each edge's reported metrics under ``edge/<id>/…``.

Where each concern lives: this module answers the RPCs (turning refusals into statuses), creates
the learners, publishes their versions and says what a snapshot holds and how a restart replays
it; authentication is :mod:`server.auth`, what an upload or a metric report may hold
:mod:`server.validation`, the registered edges, their admission rules and counters
:mod:`server.registry`, the state types :mod:`server.edges`, the learner thread and its queue (backpressure) :mod:`server.worker`, when
state is journalled and snapshotted :mod:`server.durability` (the files: :mod:`server.checkpoint`),
TensorBoard :mod:`server.telemetry`, the transport :mod:`server.wire`.

Versions are per learner, start at 0 (the state the edges' ONNX files carry) and grow by one per
publication. Without ``checkpoint_dir`` they restart at 0 with the cloud; with it every
acknowledged state change is journalled first and a restarted cloud resumes where the killed one
stood, versions above any it published (:mod:`server.checkpoint`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from torch import nn

from core.cema import CemaLearner
from core.export import Preprocess
from core.norm import norm_tensor_names, set_norm_state
from core.training import to_tensor
from protos.codec import GRPC_OPTIONS, RETRY_AFTER_KEY, encode_state
from protos.fedshift.v1 import edge_pb2 as pb
from protos.fedshift.v1 import edge_pb2_grpc as pb_grpc
from server.auth import Authenticator, AuthError, peer_common_name
from server.checkpoint import VERSION_BLOCK, Kind, journal_generations, read_journal, read_snapshot
from server.durability import Durability
from server.config import CloudConfig
from server.edges import SHARED, EdgeRecord, LearnerSlot, QueuedUpload
from server.registry import EdgeRegistry
from server.stats import CloudStats, LearnerStats
from server.telemetry import CloudTelemetry
from server.validation import MAX_SEQUENCE, upload_arrays
from server.wire import AsyncServer, Call, RateLimitedLog, add_edge_service
from server.worker import LearnerWorker

__all__ = ["CloudConfig", "CloudServer", "CloudService"]

log = logging.getLogger(__name__)

def _num_classes(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    h, w, c = image_shape
    probe = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        out = probe(torch.zeros(2, c, h, w))
    if out.ndim != 2:
        raise ValueError(f"model output must be (batch, classes), got {tuple(out.shape)}")
    return int(out.shape[1])


class CloudService(pb_grpc.EdgeServiceServicer):
    """The ``EdgeService`` implementation plus its learner worker (see the module docstring).

    ``student``/``teacher`` are templates: each learner works on its own deep copy. ``teacher``
    may be ``None`` for the cloud-Tent method. ``preprocess`` turns uploaded uint8 images into the
    student's input; it must be the edge model's own (``fedshift cloud`` reads it from the ONNX
    file the edges run), so that both sides see the same tensors.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config: CloudConfig,
                 *, preprocess: Preprocess, edge_model_sha256: str = "",
                 edge_states: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                 run_info: Mapping[str, Any] | None = None, authenticator: Authenticator | None = None) -> None:
        self.config = config
        self.preprocess = preprocess
        self.auth = authenticator or Authenticator(config.credentials or None, config.token)
        self.refused = RateLimitedLog("refused uploads (INVALID_ARGUMENT)", logger=log)
        self.edge_model_sha256 = edge_model_sha256  # the file ``preprocess`` was read from ("" unknown)
        # the normalization state of more model files edges may run (e.g. one per domain), by sha256:
        # an edge registering with one gets a student that starts from that state, its own model
        self._edge_states = {sha: dict(state) for sha, state in (edge_states or {}).items()}
        self._student = copy.deepcopy(student).cpu()
        self._teacher = copy.deepcopy(teacher).cpu() if (teacher is not None and config.cema.uses_teacher) else None
        if config.cema.uses_teacher and self._teacher is None:
            raise ValueError(f"method {config.cema.method!r} needs a teacher model")
        self.num_classes = _num_classes(self._student, config.image_shape)
        if self._teacher is not None and (tc := _num_classes(self._teacher, config.image_shape)) != self.num_classes:
            raise ValueError(f"teacher predicts {tc} classes, the student {self.num_classes}")
        self.norm_names = tuple(norm_tensor_names(self._student))
        if not self.norm_names:
            raise ValueError("the student has no normalization layers: nothing to adapt")
        self._run_info = dict(run_info or {})
        self._registry = EdgeRegistry(config.max_edges)
        self._shared = self._new_slot(SHARED) if config.shared else None
        self._started = time.time()
        # every acknowledged state change is journalled under _durable.lock, which a snapshot holds
        # too; lock order: _durable.lock -> slot.lock -> the registry's / the worker's
        self._durable = Durability(Path(config.checkpoint_dir) if config.checkpoint_dir else None,
                                   every_s=config.checkpoint_every_s, fsync=config.journal_fsync)
        self._restored_records = 0
        self.telemetry = CloudTelemetry(config.rate_interval_s)
        self._worker = LearnerWorker(self._slots, self._publish, self._durable.lock, self.telemetry,
                                     after_pass=self._log_rates)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Restore from the checkpoint folder (if any), open the TensorBoard writer and start the
        worker thread (and the periodic snapshots)."""
        if self._worker.started:
            return
        if self.config.checkpoint_dir:
            self._restore(Path(self.config.checkpoint_dir))
        if self.config.out_dir:
            self.telemetry.open(Path(self.config.out_dir) / "cloud",
                                {"cloud": self.config.to_dict(), "num_classes": self.num_classes, **self._run_info})
        self._worker.start()
        self._durable.start_periodic(self._capture)

    def begin_stop(self) -> None:
        """Refuse new work and end every Subscribe stream cleanly (before the server stops)."""
        self._worker.begin_stop()
        for slot in self._slots():
            slot.wake_watchers()

    def close(self) -> None:
        """Join the worker, take the last snapshot, write the final stats and close the writer
        (after the server stopped)."""
        self.begin_stop()
        self._durable.stop_periodic()
        self._worker.join()
        self._durable.close(self._capture)  # the final snapshot: a restart resumes at the next version
        if self.config.out_dir:
            path = Path(self.config.out_dir) / "cloud" / "stats.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.stats().write(path)
        self.telemetry.close()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every queued upload went through the learners and no step is running."""
        return self._worker.wait_idle(timeout)

    # ---------------------------------------------------------------- inspection

    def stats(self) -> CloudStats:
        """Counters per edge and per learner (also written to ``cloud/stats.json`` at shutdown)."""
        edges, totals = self._registry.stats()
        pending: dict[str, int] = {}
        for item in self._worker.pending():
            pending[item.slot.name] = pending.get(item.slot.name, 0) + len(item.images)
        learners = {s.name: LearnerStats(version=s.version, steps=s.steps, episode=s.episode, errors=s.errors,
                                         queue=s.learner.queue_size, replay=len(s.learner.replay),
                                         learned_samples=s.learned_samples, pending_samples=pending.get(s.name, 0))
                    for s in self._slots()}
        return CloudStats(edges=edges, learners=learners, uptime_s=round(time.time() - self._started, 2),
                          checkpoints=self._durable.checkpoints, restored_records=self._restored_records, **totals)

    def memory_bound(self) -> dict[str, float]:
        """What the configuration lets each kind of state take at most, in MB: the learners
        (``max_edges`` of them per edge, one shared: models + a full replay of float32 samples),
        the backlog of samples waiting for them, and the requests open at once."""
        cfg = self.config
        sample = 4 * math.prod(cfg.image_shape)  # a preprocessed sample (float32)
        models = 4 * sum(p.numel() for m in (self._student, self._teacher) if m is not None for p in m.state_dict().values())
        learner = models + cfg.cema.replay_capacity * sample
        learners = 1 if cfg.shared else cfg.max_edges
        mb = 2.0 ** 20
        return {"per_learner": learner / mb, "learners": learners * learner / mb, "backlog": cfg.max_backlog * sample / mb,
                "requests": (cfg.max_inflight_rpcs + cfg.max_edges) * cfg.max_message_bytes / mb}

    def learner(self, edge_id: str) -> CemaLearner:
        """The learner serving ``edge_id`` (for tests and offline inspection; call when idle)."""
        return self._registry.require(edge_id).slot.learner

    # ---------------------------------------------------------------- RPCs

    def Register(self, request: pb.RegisterRequest, context: Call) -> pb.RegisterReply:
        self._authorize(request.edge_id, request.auth_token, context)
        if not request.edge_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "edge_id must not be empty")
        if request.norm_names and set(request.norm_names) != set(self.norm_names):
            missing = sorted(set(self.norm_names) - set(request.norm_names))[:4]
            extra = sorted(set(request.norm_names) - set(self.norm_names))[:4]
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"edge model does not match the cloud's student (norm tensors missing at the edge: "
                          f"{missing}, unknown to the cloud: {extra})")
        known = request.model_sha256 in self._edge_states
        if self.edge_model_sha256 and request.model_sha256 and request.model_sha256 != self.edge_model_sha256 \
                and not known:
            log.warning("edge %s runs a model file (sha256 %s…) other than the cloud's edge model (%s…): its uploads "
                        "are preprocessed with the cloud's file's metadata", request.edge_id,
                        request.model_sha256[:12], self.edge_model_sha256[:12])
        with self._durable.lock:
            edge = self._register_edge(request.edge_id, request.model_id, request.model_sha256, context)
            next_seq = self._registry.next_sequence(edge)
        return pb.RegisterReply(version=edge.slot.version, next_sequence=next_seq,
                                max_message_bytes=self.config.max_message_bytes)

    def _register_edge(self, edge_id: str, model_id: str, model_sha256: str,
                       context: Call | None = None) -> EdgeRecord:
        """Add an edge (with its learner) or record its new model file; journalled (caller holds
        ``_durable.lock``; ``context`` None: replaying the journal)."""
        edge = self._registry.get(edge_id)
        if edge is None and self._registry.is_full_for(edge_id):
            message = f"the cloud serves at most {self.config.max_edges} edges (max_edges)"
            if context is None:
                raise ValueError(message)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        changed = edge is None or (edge.model_id, edge.model_sha256) != (model_id, model_sha256)
        if changed:
            self._durable.record(Kind.REGISTER, {"edge_id": edge_id, "model_id": model_id, "model_sha256": model_sha256})
        if edge is None:
            slot = self._shared or self._new_slot(edge_id, model_sha256)
            edge = EdgeRecord(edge_id, model_id, model_sha256, slot)
            self._registry.add(edge)
            log.info("edge %s registered (model %s, sha256 %s…, learner %s)", edge_id, model_id or "?",
                     model_sha256[:12], edge.slot.name)
            return edge
        if model_sha256 and edge.model_sha256 and model_sha256 != edge.model_sha256:
            log.warning("edge %s re-registered with another model file (sha256 %s… → %s…)",
                        edge_id, edge.model_sha256[:12], model_sha256[:12])
        self._registry.set_model(edge, model_id, model_sha256)
        if context is not None:
            log.info("edge %s re-registered", edge_id)
        return edge

    def Upload(self, request: pb.UploadRequest, context: Call) -> pb.UploadReply:
        self._authorize(request.edge_id, request.auth_token, context)
        edge = self._edge(request.edge_id, context)
        seq = int(request.sequence)
        if seq >= MAX_SEQUENCE:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"sequence {seq} is out of range (must be < 2^63)")
        if self._registry.check_duplicate(edge, seq):
            return pb.UploadReply(sequence=seq, duplicate=True, accepted=0, latest_version=edge.slot.version)
        try:
            images, labels = self._upload_arrays(request)
        except ValueError as exc:
            self.refused.record(f"edge {request.edge_id} upload {seq}: {exc}")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"upload {seq}: {exc}")
        n = len(images)
        if self._worker.stopping:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the cloud is shutting down")
        backlog = self._worker.backlog()
        if backlog + n > self.config.max_backlog:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(int(1000 * self.config.retry_after_s))),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"upload {seq}: {backlog} samples already wait for the learners (limit "
                          f"{self.config.max_backlog}); retry later")
        tensor = to_tensor(images, self.preprocess)
        with self._durable.lock:
            outcome, current = self._registry.admit(edge, seq, int(request.episode))
            if outcome in ("stale", "accepted"):
                self._durable.record_upload(request)
            item = self._accept(edge, request, outcome, tensor, labels)
        if outcome == "duplicate":  # a concurrent retry of the same upload won the race
            return pb.UploadReply(sequence=seq, duplicate=True, accepted=0, latest_version=edge.slot.version)
        if outcome == "future":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"upload {seq} is for episode {request.episode} but this edge is in episode {current}; "
                          "call Reset first")
        if outcome == "stale":  # recorded (so a retry is a duplicate), acknowledged, not learned from
            log.info("edge %s upload %d belongs to past episode %d (now %d): acknowledged, not queued",
                     request.edge_id, seq, request.episode, current)
            return pb.UploadReply(sequence=seq, duplicate=False, accepted=0, latest_version=edge.slot.version)
        assert item is not None
        if self.config.lockstep and not item.done.wait(self.config.lockstep_timeout_s):
            log.warning("edge %s upload %d: not processed within %.0f s (lockstep)", request.edge_id, seq,
                        self.config.lockstep_timeout_s)
        return pb.UploadReply(sequence=seq, duplicate=False, accepted=n, latest_version=edge.slot.version)

    def _accept(self, edge: EdgeRecord, request: pb.UploadRequest, outcome: str, images: torch.Tensor,
                labels: np.ndarray) -> QueuedUpload | None:
        """Count an admitted upload and queue it for the learner (caller holds ``_durable.lock``,
        the upload journalled); returns the queued item."""
        if not self._registry.record(edge, outcome, int(request.sequence), int(request.seen), len(images)):
            return None
        item = QueuedUpload(edge.slot, edge.edge_id, int(request.episode), images, labels)
        self._worker.enqueue(item)
        return item

    def Subscribe(self, request: pb.SubscribeRequest, context: Call) -> "_Subscription":
        """A stream of the newest versions after ``after_version`` (the transport polls it; it costs
        no thread while it waits)."""
        self._authorize(request.edge_id, request.auth_token, context)
        return _Subscription(self, self._edge(request.edge_id, context).slot, int(request.after_version))

    @property
    def stopping(self) -> bool:
        return self._worker.stopping

    def ReportMetrics(self, request: pb.MetricsReport, context: Call) -> pb.MetricsAck:
        self._authorize(request.edge_id, request.auth_token, context)
        edge = self._edge(request.edge_id, context)
        try:
            values = self._registry.report_metrics(edge, request.values)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for key, value in values.items():
            self.telemetry.scalar(f"edge/{request.edge_id}/{key}", value, int(request.step))
        return pb.MetricsAck()

    def Reset(self, request: pb.ResetRequest, context: Call) -> pb.ResetReply:
        self._authorize(request.edge_id, request.auth_token, context)
        edge = self._edge(request.edge_id, context)
        episode = int(request.episode)
        version = edge.slot.version  # equal episodes: a retried Reset (its reply was lost), nothing to redo
        with self._durable.lock:
            current = self._registry.episode(edge)
            if episode > current:
                self._durable.record(Kind.RESET, {"edge_id": edge.edge_id, "episode": episode})
                version = self._start_episode(edge, episode)
        if episode < current:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"episode {episode} is older than this edge's current episode {current}")
        return pb.ResetReply(version=version, episode=episode)

    def _start_episode(self, edge: EdgeRecord, episode: int) -> int:
        """Move an edge to a newer episode; the first edge entering it resets the learner and
        publishes its initial state (caller holds ``_durable.lock``, the change journalled)."""
        self._registry.set_episode(edge, episode)
        slot = edge.slot
        with slot.lock:  # waits for a running step
            if episode > slot.episode:
                slot.learner.reset()
                slot.episode = episode
                self._publish(slot)
                log.info("learner %s reset for episode %d (version %d)", slot.name, episode, slot.version)
            return slot.version

    # ---------------------------------------------------------------- durability (server.checkpoint)

    def checkpoint(self, final: bool = False) -> Path | None:
        """Write a snapshot of the whole service state and drop the journal it covers; ``None``
        without ``checkpoint_dir``. Safe at any time; RPCs wait for at most one learner step.
        ``final`` (shutdown, after the worker stopped): a restart resumes at the next version."""
        return self._durable.snapshot(self._capture, final)

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on with the cloud restoring it."""
        cema = self.config.cema
        return {"norm_names": list(self.norm_names), "num_classes": self.num_classes, "shared": self.config.shared,
                "image_shape": list(self.config.image_shape), "method": cema.method, "edge_norm": cema.edge_norm,
                "teacher": self._teacher is not None}

    def _capture(self, final: bool = False) -> dict[str, Any]:
        """The service state as plain values and tensors (caller holds ``_durable.lock``)."""
        registry = self._registry.state()
        slots = {}
        for slot in self._slots():
            with slot.lock:  # waits for a running step
                slots[slot.name] = slot.state(final)
        pending = [item.state() for item in self._worker.pending()]
        return {"fingerprint": self._fingerprint(), **registry, "slots": slots, "pending": pending}

    def _restore(self, directory: Path) -> None:
        """Load the snapshot, replay the journal after it, resume every learner's versions above the
        last reserved ceiling, then open a new journal generation and take a fresh snapshot."""
        snapshot = read_snapshot(directory)
        generations = journal_generations(directory)
        first = int(snapshot["journal_generation"]) if snapshot is not None else (generations[0] if generations else 0)
        ceilings: dict[str, int] = {}
        if snapshot is not None:
            self._load(snapshot, directory)
        for kind, payload in read_journal(directory, first):
            try:
                self._replay(kind, payload, ceilings)
            except (ValueError, KeyError, DecodeError) as exc:
                log.error("checkpoint %s: journal record (%s) not replayed: %s", directory, kind.name, exc)
                continue
            self._restored_records += 1
        self._worker.feed(self._worker.take_pending())  # the replayed uploads go to their learners now
        self._durable.open(max([first - 1, *generations]) + 1)
        for slot in self._slots():
            with slot.lock:
                slot.version = max(slot.version, slot.ceiling, ceilings.get(slot.name, 0))
                slot.ceiling = slot.version
                if snapshot is not None or self._restored_records:
                    self._publish(slot)  # above every version published before the restart
        if snapshot is not None or self._restored_records:
            log.info("restored from %s: %d edges, %d accepted samples, %d journal records replayed", directory,
                     len(self._registry), self._registry.totals()[2], self._restored_records)
            self.checkpoint()
        else:
            log.info("checkpoints go to %s (nothing to restore)", directory)

    def _load(self, snapshot: Mapping[str, Any], directory: Path) -> None:
        if (theirs := snapshot["fingerprint"]) != (ours := self._fingerprint()):
            differ = sorted(k for k in ours if theirs.get(k) != ours[k])
            raise ValueError(f"checkpoint {directory} was written by a cloud set up differently ({', '.join(differ)} "
                             "differ): restart with that setup, or give another checkpoint_dir")
        slots: dict[str, LearnerSlot] = {}
        for name, state in snapshot["slots"].items():
            slot = self._shared if (self._shared is not None and name == SHARED) else \
                self._new_slot(name, state["template_sha256"])
            slot.load(state)
            slots[name] = slot
        self._registry.load(snapshot, slots)
        self._worker.feed([QueuedUpload(slots[item["slot"]], item["edge_id"], int(item["episode"]), item["images"],
                          item["labels"].numpy()) for item in snapshot["pending"]])

    def _replay(self, kind: Kind, payload: bytes, ceilings: dict[str, int]) -> None:
        """Apply one journal record through the same paths as the RPC that wrote it (no journal
        is open yet, so nothing is written again)."""
        if kind == Kind.CEILING:
            value = json.loads(payload)
            ceilings[value["slot"]] = max(ceilings.get(value["slot"], 0), int(value["version"]))
        elif kind == Kind.REGISTER:
            value = json.loads(payload)
            self._register_edge(value["edge_id"], value["model_id"], value["model_sha256"])
        elif kind == Kind.RESET:
            value = json.loads(payload)
            self._start_episode(self._registry.require(value["edge_id"]), int(value["episode"]))
        elif kind == Kind.UPLOAD:
            request = pb.UploadRequest.FromString(payload)
            edge = self._registry.require(request.edge_id)
            images, labels = self._upload_arrays(request)
            outcome, _ = self._registry.admit(edge, int(request.sequence), int(request.episode))
            self._accept(edge, request, outcome, to_tensor(images, self.preprocess), labels)

    # ---------------------------------------------------------------- helpers

    def _authorize(self, edge_id: str, token: str, context: Call) -> None:
        """Every RPC's first line: :class:`server.auth.Authenticator`'s rules, as a gRPC status."""
        try:
            self.auth.check(edge_id, token, peer_common_name(context))
        except AuthError as exc:
            context.abort(exc.code, str(exc))

    def _edge(self, edge_id: str, context: Call) -> EdgeRecord:
        edge = self._registry.get(edge_id)
        if edge is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"edge {edge_id!r} is not registered; call Register first")
        return edge

    def _upload_arrays(self, request: pb.UploadRequest) -> tuple[np.ndarray, np.ndarray]:
        """:func:`server.validation.upload_arrays` with this cloud's model and limits."""
        return upload_arrays(request, image_shape=self.config.image_shape, max_samples=self.config.max_upload_samples,
                             num_classes=self.num_classes)

    def _new_slot(self, name: str, model_sha256: str = "") -> LearnerSlot:
        """A learner whose student starts from the template, or from the normalization state of the
        edge's own model file when the cloud was given it (``edge_models``)."""
        student = copy.deepcopy(self._student)
        norm_state = self._edge_states.get(model_sha256)
        if norm_state is not None:
            set_norm_state(student, norm_state)
            log.info("learner %s starts from its edge's own model file", name)
        learner = CemaLearner(student,
                              copy.deepcopy(self._teacher) if self._teacher is not None else None,
                              self.config.cema, num_classes=self.num_classes, device=self.config.device)
        return LearnerSlot(name, learner, model_sha256 if norm_state is not None else "")

    def _slots(self) -> list[LearnerSlot]:
        if self._shared is not None:
            return [self._shared]
        return self._registry.slots()

    def _publish(self, slot: LearnerSlot) -> None:
        """Make the learner's normalization state the slot's next version (caller holds ``slot.lock``)."""
        tensors = encode_state(slot.learner.norm_state())
        if self._durable.enabled and slot.version + 1 > slot.ceiling:  # reserve before publishing
            slot.ceiling = slot.version + VERSION_BLOCK
            self._durable.record(Kind.CEILING, {"slot": slot.name, "version": slot.ceiling})
        with slot.cond:
            slot.version += 1
            slot.tensors = tensors
            slot.created_unix = time.time()
        slot.wake_watchers()
        self._registry.count_publication()
        self._durable.changed()

    def _log_rates(self) -> None:
        """After each pass of the learner thread: the cloud's rates (:meth:`CloudTelemetry.rates`)."""
        self.telemetry.rates(*self._registry.totals())


class _Subscription:
    """One edge's Subscribe stream (:class:`server.wire.UpdateStream`): the newest version after the
    last one sent; an edge that is behind gets the newest only and skips the rest."""

    def __init__(self, service: CloudService, slot: LearnerSlot, after_version: int) -> None:
        self._service, self._slot, self._last = service, slot, after_version
        self._wake: Callable[[], None] | None = None

    def poll(self) -> pb.ParameterUpdate | None:
        with self._slot.cond:
            if self._slot.version <= self._last:
                return None
            update = self._slot.update()
        self._last = update.version
        return update

    @property
    def ended(self) -> bool:
        return self._service.stopping

    def watch(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._slot.watch(wake)

    def close(self) -> None:
        if self._wake is not None:
            self._slot.unwatch(self._wake)


class CloudServer:
    """A gRPC server hosting :class:`CloudService` on ``host:port`` (``port`` 0: a free one).

    ``with CloudServer(...) as server:`` starts it and stops it cleanly (worker joined, RPC threads
    shut down, TensorBoard writer closed). The server is ``grpc.aio`` on a loop thread of its own
    (:class:`server.wire.AsyncServer`): subscriptions cost no thread; unary calls run on
    ``max_workers`` pool threads; at most ``max_edges + max_inflight_rpcs`` calls are open at once
    (grpc answers more with RESOURCE_EXHAUSTED), which bounds the memory held by requests.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config: CloudConfig,
                 *, preprocess: Preprocess, edge_model_sha256: str = "",
                 edge_states: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                 run_info: Mapping[str, Any] | None = None, authenticator: Authenticator | None = None) -> None:
        self.config = config
        self._credentials = self._transport_credentials(config)  # refused before anything starts
        self.service = CloudService(student, teacher, config, preprocess=preprocess,
                                    edge_model_sha256=edge_model_sha256, edge_states=edge_states,
                                    run_info=run_info, authenticator=authenticator)
        self._executor = ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="cloud-rpc")
        options = [(k, v) for k, v in GRPC_OPTIONS if k != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", config.max_message_bytes))  # bounds in-flight memory
        self._server = AsyncServer(options, maximum_concurrent_rpcs=config.max_edges + config.max_inflight_rpcs)
        self.undecodable = RateLimitedLog("undecodable requests")
        # our decoding: garbage -> INVALID_ARGUMENT
        self._server.call(lambda: add_edge_service(self._server.server, self.service, self.undecodable,
                                                   self._executor))
        host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
        try:
            self.port = self._server.call(lambda: self._bind(f"{host}:{config.port}"))
        except RuntimeError as exc:
            self._release()
            raise OSError(f"cannot bind {host}:{config.port}: {exc}") from exc
        if self.port == 0:
            self._release()
            raise OSError(f"cannot bind {host}:{config.port}")
        self.address = f"{host}:{self.port}"
        self._started = False

    @staticmethod
    def _transport_credentials(cfg: CloudConfig) -> grpc.ServerCredentials | None:
        """TLS (mutual with a client CA) when configured; ``None`` = plaintext, only when asked for."""
        if cfg.tls_cert:
            from protos.tls import server_credentials

            return server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        if not cfg.insecure:
            raise ValueError("refusing to serve plaintext gRPC: give --tls-cert and --tls-key (test ones: "
                             "`fedshift certs DIR --hosts 127.0.0.1,localhost`), or --insecure on a trusted network")
        return None

    @property
    def transport(self) -> str:
        return ("mutual TLS" if self.config.tls_client_ca else "TLS") if self._credentials is not None else "plaintext"

    def _bind(self, address: str) -> int:
        if self._credentials is not None:
            return self._server.server.add_secure_port(address, self._credentials)
        return self._server.server.add_insecure_port(address)

    def _release(self) -> None:
        """Free the loop thread and the pool of a server that is not serving (idempotent)."""
        self._server.close()
        self._executor.shutdown(wait=False)

    def start(self) -> "CloudServer":
        try:
            self.service.start()  # restores a checkpoint first: may refuse
            self._server.start()
        except BaseException:
            self.service.close()
            self._release()
            raise
        self._started = True
        log.info("cloud listening on %s (%s, authentication: %s; method %s, %s students)", self.address,
                 self.transport, self.service.auth.mode, self.config.cema.method,
                 "shared" if self.config.shared else "per-edge")
        if self._credentials is None:
            log.warning("INSECURE: the cloud on %s serves plaintext gRPC: uploads, updates and tokens cross the "
                        "network unencrypted (--insecure)", self.address)
        if self.service.auth.mode == "none":
            log.warning("no authentication: any caller may register as any edge (give --credentials)")
        bound = self.service.memory_bound()
        log.info("memory bound by the configuration: learners %.0f MB (%s x %.1f MB), backlog %.0f MB, open requests "
                 "%.0f MB (lower max_edges, replay_capacity, max_backlog, max_inflight_rpcs or max_upload_samples)",
                 bound["learners"], 1 if self.config.shared else self.config.max_edges, bound["per_learner"],
                 bound["backlog"], bound["requests"])
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """End subscriptions, stop accepting RPCs (in-flight ones get ``grace`` seconds), then
        join the worker and close the writer. Idempotent."""
        if not self._started:
            self._release()
            return
        self._started = False
        self.service.begin_stop()
        self._server.stop(grace)
        self._executor.shutdown(wait=True)
        self._server.close()
        self.service.close()
        log.info("cloud on %s stopped", self.address)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server terminates (or ``timeout``); True if it did."""
        return self._server.wait(timeout)

    def __enter__(self) -> "CloudServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
