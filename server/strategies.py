"""Server strategies: FedAvg, FedProx, FedBN, local-only and FRAug, all on Flower's FedAvg.

They differ only in what crosses the network:

- FedAvg / FedProx: the whole model (FedProx also sends ``proximal-mu`` for the client's term);
- FedBN: everything but the normalization layers (selected by module type via
  :func:`core.norm.is_norm_key`); norm tensors are never sent and, should a client send them
  anyway, never averaged;
- local-only: nothing (each client keeps its whole model; the reference FL must beat);
- FRAug: FedBN's split plus the generator G, which this strategy holds: averaged from the clients
  by sample count each round and sent back with the model (as ``generator.*`` arrays).

Every strategy also counts the bytes each way and hands each client's metrics to the
:class:`~server.recorder.RunRecorder`.

Run through :meth:`FedShiftStrategy.start`, a round's client-side evaluation travels with the next
round's train message (which carries the very arrays an evaluate message would): one message per
client per round instead of two, and only the last round sends evaluate messages. Round ``r`` is
recorded (and checkpointed) when round ``r + 1``'s training replies bring its evaluation back.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from core.fl_config import (
    CLIENT_STATE_RECORD,
    DEPLOY_NORM_RECORD,
    EVALUATE_RECEIVED_KEY,
    GLOBAL_ROUND_KEY,
    EVALUATED_PREFIX,
    GENERATOR_PREFIX,
    PARTITION_KEY,
    SEND_STATE_KEY,
    WEIGHT_KEY,
    has_non_finite,
)
from server.recorder import RunRecorder
from server.update_checks import StepJumpGuard, update_problem

log = logging.getLogger(__name__)


def message_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (array payloads + key names; metrics are tiny)."""
    return sum(rec.count_bytes() for rec in content.array_records.values())


def mean_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted means of every numeric metric except the weight and the partition id."""
    weights = np.array([float(next(iter(r.metric_records.values()))[weight_key]) for r in records])
    weights = weights / weights.sum()
    out = MetricRecord()
    first = next(iter(records[0].metric_records.values()))
    for key, value in first.items():
        if key in (weight_key, PARTITION_KEY) or isinstance(value, list):
            continue
        vals = [float(next(iter(r.metric_records.values()))[key]) for r in records]
        out[key] = float(np.dot(weights, vals))
    return out


def _client_metrics(replies: Iterable[Message]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for msg in replies:
        if msg.has_error():
            continue
        metrics = next(iter(msg.content.metric_records.values()))
        pid = int(metrics[PARTITION_KEY]) if PARTITION_KEY in metrics else int(msg.metadata.src_node_id)
        out[pid] = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
    return out


def pop_evaluated(replies: Iterable[Message]) -> dict[int, dict[str, float]]:
    """Take the folded-in evaluation metrics (``EVALUATED_PREFIX`` keys) out of train replies:
    per client, without the prefix; the replies keep only their training metrics."""
    out: dict[int, dict[str, float]] = {}
    for msg in replies:
        if msg.has_error():
            continue
        metrics = next(iter(msg.content.metric_records.values()))
        keys = [k for k in metrics if k.startswith(EVALUATED_PREFIX)]
        if not keys:
            continue
        evaluated = {k[len(EVALUATED_PREFIX):]: metrics.pop(k) for k in keys}
        pid = int(evaluated.get(PARTITION_KEY, metrics.get(PARTITION_KEY, msg.metadata.src_node_id)))
        out[pid] = {k: float(v) for k, v in evaluated.items() if not isinstance(v, list)}
    return out


def in_client_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by partition id: replies arrive in whatever order the actors finish, and
    a float sum in arrival order would make otherwise seeded runs differ from run to run."""

    def key(msg: Message) -> tuple[int, int]:
        if msg.has_error():
            return (1, 0)
        metrics = next(iter(msg.content.metric_records.values()), {})
        return (0, int(metrics.get(PARTITION_KEY, msg.metadata.src_node_id)))

    return sorted(replies, key=key)


def _pop_records(replies: Iterable[Message], name: str) -> dict[int, ArrayRecord]:
    """Take record ``name`` out of every reply that has one (by ``id`` of the reply)."""
    out = {}
    for msg in replies:
        if not msg.has_error() and name in msg.content.array_records:
            out[id(msg)] = msg.content[name]
            del msg.content[name]
    return out


def without_keys(record: ArrayRecord, drop: Collection[str]) -> ArrayRecord:
    """A new ArrayRecord holding the same Arrays minus ``drop``."""
    return ArrayRecord(array_dict={k: v for k, v in record.items() if k not in drop})


@dataclass(frozen=True)
class RoundEnd:
    """What the server app receives after every round (evaluation included)."""

    round: int  # global round (resumes included)
    arrays: ArrayRecord  # the global model's shared arrays
    generator: ArrayRecord | None  # FRAug's G
    deploy_norm: ArrayRecord | None  # the clients' local norm layers, averaged, for the deployed model
    client_norm: dict[int, dict[str, np.ndarray]]  # each client's own local norm layers
    client_state: dict[int, ArrayRecord]  # each client's whole Context.state, as of its last checkpoint round
    checkpoint: bool  # a checkpoint round: client_state is this round's


class FedShiftStrategy(FedAvg):
    """FedAvg + what every fedshift strategy shares: local keys, byte counting, recording.

    ``local_keys`` are state-dict keys that stay on the clients: filtered out of what is sent and
    out of every reply before averaging. ``round_offset`` shifts round numbers after a resume.

    Checkpoint rounds (every ``checkpoint_every`` global rounds, and ``last_round`` of this run)
    ask the clients for their whole state (``send-state``); ``restore`` (node id → a state from a
    checkpoint) goes out once, with the first training messages after a resume. Neither counts in
    the byte figures, which measure the algorithm's traffic.
    """

    def __init__(
        self,
        *,
        local_keys: Collection[str] = (),
        recorder: RunRecorder | None = None,
        round_offset: int = 0,
        on_round_end: Callable[[RoundEnd], None] | None = None,
        checkpoint_every: int = 1,
        last_round: int = 0,
        restore: dict[int, ArrayRecord] | None = None,
        max_update_jump: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", mean_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", mean_metrics)
        super().__init__(**kwargs)
        self.local_keys = frozenset(local_keys)
        self.recorder = recorder
        self.round_offset = round_offset
        self.on_round_end = on_round_end
        self.latest_arrays: ArrayRecord | None = None
        self.deploy_norm: ArrayRecord | None = None  # averaged local norm layers, for export only
        # each client's own local norm layers (its newest reply), for per-client (non-IID) edges
        self.client_norm: dict[int, dict[str, np.ndarray]] = {}
        self._down: dict[str, int] = {"train": 0, "evaluate": 0}
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.checkpoint_every, self.last_round = checkpoint_every, last_round
        self.client_state: dict[int, ArrayRecord] = {}  # partition id -> state of its last checkpoint round
        self._restore = dict(restore or {})  # node id -> state, sent once
        self.num_rounds: int | None = None  # known inside start(): evaluation then rides on training
        self._sent: dict[str, tuple[tuple[int, ...], str]] = {}  # key -> (shape, dtype) of this round's model
        self.rejected = 0  # client updates refused (non-finite, mis-shaped, a jump), over the run
        self.step_guard = StepJumpGuard(max_update_jump) if max_update_jump else None

    def is_checkpoint_round(self, server_round: int) -> bool:
        """Every ``checkpoint_every`` global rounds, and always the last round of this run."""
        return (server_round + self.round_offset) % self.checkpoint_every == 0 or server_round == self.last_round

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs: Any) -> Any:
        """Flower's round loop, with each round's evaluation folded into the next train message."""
        self.num_rounds = num_rounds
        try:
            return super().start(grid, initial_arrays, num_rounds, **kwargs)
        finally:
            self.num_rounds = None

    def _evaluation_deferred(self, server_round: int) -> bool:
        """Whether round ``server_round`` is evaluated by the next round's train message."""
        return self.num_rounds is not None and server_round < self.num_rounds

    # ---------------------------------------------------------------- hooks for subclasses
    def outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """What the clients receive: the global arrays minus the local keys."""
        return without_keys(arrays, self.local_keys)

    def incoming(self, aggregated: ArrayRecord | None) -> ArrayRecord | None:
        """Post-process the averaged arrays (FRAug splits its generator off here)."""
        return aggregated

    def generator_arrays(self) -> ArrayRecord | None:
        return None

    def round_config(self, config: ConfigRecord, server_round: int) -> ConfigRecord:
        config[GLOBAL_ROUND_KEY] = server_round + self.round_offset
        config[SEND_STATE_KEY] = self.is_checkpoint_round(server_round)
        return config

    # ---------------------------------------------------------------- Flower API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.latest_arrays = arrays
        config = self.round_config(config, server_round)
        if server_round > 1 and self._evaluation_deferred(server_round - 1):
            config[EVALUATE_RECEIVED_KEY] = True
        outgoing = self.outgoing(arrays)
        self._sent = {k: (tuple(v.shape), v.dtype) for k, v in outgoing.items()}  # what a reply must match
        if self.step_guard is not None:
            self.step_guard.begin_round(outgoing)
        messages = list(super().configure_train(server_round, outgoing, config, grid))
        self._down["train"] = sum(message_bytes(m.content) for m in messages)
        if self._restore:
            messages = [self._with_state(m) for m in messages]
            self._restore.clear()
        return messages

    def _with_state(self, msg: Message) -> Message:
        """The message with its node's checkpointed state added (contents are shared between the
        messages FedAvg builds, so each gets its own RecordDict)."""
        state = self._restore.get(msg.metadata.dst_node_id)
        if state is None:
            log.warning("node %d has no checkpointed state: it starts this run with a fresh one",
                        msg.metadata.dst_node_id)
            return msg
        content = RecordDict(dict(msg.content.items()))
        content[CLIENT_STATE_RECORD] = state
        return Message(content=content, message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = in_client_order(replies)
        if server_round > 1 and self._evaluation_deferred(server_round - 1):
            # before anything of this round: the checkpoint of the previous round needs its
            # arrays, generator, norm layers and client states
            self._close_round(server_round - 1, pop_evaluated(replies), bytes_down=0)
        # Flower averages exactly one ArrayRecord per reply: the extra records come off first, and
        # count only for the replies that pass the check below
        states = _pop_records(replies, CLIENT_STATE_RECORD)
        up = sum(message_bytes(m.content) for m in replies if not m.has_error())
        norms = _pop_records(replies, DEPLOY_NORM_RECORD)
        for msg in replies:  # local layers are never averaged, whatever a client sends
            if not msg.has_error():
                for key, rec in list(msg.content.array_records.items()):
                    if self.local_keys & set(rec.keys()):
                        msg.content[key] = without_keys(rec, self.local_keys)
        replies = self._reject_bad_updates(server_round, replies, norms)
        self._take_client_state([(m, states[id(m)]) for m in replies if id(m) in states])
        self._take_deploy_norm([(m, norms[id(m)]) for m in replies if id(m) in norms])
        arrays, metrics = super().aggregate_train(server_round, replies)
        arrays = self.incoming(arrays)
        if arrays is not None:
            self.latest_arrays = arrays
        if self.recorder is not None:
            self.recorder.train_round(server_round + self.round_offset, _client_metrics(replies),
                                      self._down["train"], up)
        return arrays, metrics

    def _reject_bad_updates(self, server_round: int, replies: list[Message],
                            norms: dict[int, ArrayRecord]) -> list[Message]:
        """Drop replies whose update is not a finite copy of what was sent (same keys and shapes,
        numeric, no NaN/Inf, a positive finite sample count; finite local norm layers too) or, with
        ``max_update_jump``, whose step jumped (:class:`StepJumpGuard`), logging each; the round
        goes on with the rest (all rejected: the global model stays as it was)."""
        problems: list[tuple[Message, str | None]] = []
        for msg in replies:
            why = None if msg.has_error() else update_problem(msg, self._sent)
            if why is None and id(msg) in norms:
                why = next((f"local {k}: NaN or Inf values" for k, v in norms[id(msg)].items()
                            if has_non_finite(v.numpy())), None)
            problems.append((msg, why))
        if self.step_guard is not None and self._sent:  # judged together: the round's own steps count
            sound = [m for m, why in problems if why is None and not m.has_error()]  # errors: FedAvg drops them
            verdicts = dict(zip(map(id, sound), self.step_guard.judge(
                [self.step_guard.step(next(iter(m.content.array_records.values()))) for m in sound])))
            problems = [(m, why if why is not None else verdicts.get(id(m))) for m, why in problems]
        kept = []
        for msg, why in problems:
            if why is None:
                kept.append(msg)
                continue
            pid = next(iter(msg.content.metric_records.values()), {}).get(PARTITION_KEY, "?")
            self.rejected += 1
            log.warning("round %d: rejected the update of node %d (partition %s): %s", server_round + self.round_offset,
                        msg.metadata.src_node_id, pid, why)
        return kept

    def _take_client_state(self, parts: list[tuple[Message, ArrayRecord]]) -> None:
        """Keep each accepted client's checkpointed state by partition."""
        for msg, state in parts:
            metrics = next(iter(msg.content.metric_records.values()), {})
            if PARTITION_KEY not in metrics:
                log.warning("node %d sent its state without a partition id: not checkpointed", msg.metadata.src_node_id)
                continue
            self.client_state[int(metrics[PARTITION_KEY])] = state

    def _take_deploy_norm(self, parts: list[tuple[Message, ArrayRecord]]) -> None:
        """Keep each accepted client's local norm layers, and their sample-weighted average for the
        deployed model."""
        weighted = []
        for msg, record in parts:
            metrics = next(iter(msg.content.metric_records.values()))
            arrays = {k: v.numpy() for k, v in record.items()}
            weighted.append((float(metrics[WEIGHT_KEY]), arrays))
            if PARTITION_KEY in metrics:
                self.client_norm[int(metrics[PARTITION_KEY])] = arrays
        if not weighted:
            return
        total = sum(w for w, _ in weighted)
        self.deploy_norm = ArrayRecord(array_dict={
            k: Array(np.asarray(sum(w * p[k].astype(np.float64) for w, p in weighted) / total,
                                dtype=weighted[0][1][k].dtype))
            for k in weighted[0][1]})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self._evaluation_deferred(server_round):
            return []  # evaluated with the next round's train message
        messages = list(super().configure_evaluate(server_round, self.outgoing(arrays),
                                                   self.round_config(config, server_round), grid))
        self._down["evaluate"] = sum(message_bytes(m.content) for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self._evaluation_deferred(server_round):
            return None  # its replies come with the next round's training
        replies = in_client_order(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        self._close_round(server_round, _client_metrics(replies), self._down["evaluate"])
        return metrics

    def _close_round(self, server_round: int, evaluated: dict[int, dict[str, float]], bytes_down: int) -> None:
        """Record a round's evaluation and hand its global state to ``on_round_end``."""
        rnd = server_round + self.round_offset
        if self.recorder is not None:
            self.recorder.eval_round(rnd, evaluated, bytes_down, 0)
        if self.on_round_end is not None and self.latest_arrays is not None:
            self.on_round_end(RoundEnd(round=rnd, arrays=self.latest_arrays, generator=self.generator_arrays(),
                                       deploy_norm=self.deploy_norm, client_norm=self.client_norm,
                                       client_state=self.client_state,
                                       checkpoint=self.is_checkpoint_round(server_round)))


class FedAvgStrategy(FedShiftStrategy):
    """Plain FedAvg: the whole model is averaged by sample count."""


class FedProxStrategy(FedShiftStrategy):
    """FedAvg on the server; clients add ``μ/2‖w − w_global‖²`` (μ sent as ``proximal-mu``)."""

    def __init__(self, *, proximal_mu: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def round_config(self, config: ConfigRecord, server_round: int) -> ConfigRecord:
        config = super().round_config(config, server_round)
        config["proximal-mu"] = float(self.proximal_mu)
        return config


class FedBNStrategy(FedShiftStrategy):
    """FedBN: normalization layers stay local (pass ``local_keys`` = the norm keys)."""

    def __init__(self, *, local_keys: Collection[str], **kwargs: Any) -> None:
        if not local_keys:
            raise ValueError("FedBN needs the normalization keys to keep local")
        super().__init__(local_keys=local_keys, **kwargs)


class LocalOnlyStrategy(FedShiftStrategy):
    """No aggregation: nothing is sent, each client trains its own model (the FL reference)."""

    def outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord()

    def incoming(self, aggregated: ArrayRecord | None) -> ArrayRecord | None:
        return None  # keep the (unused) initial arrays as the "global" model


class FRAugStrategy(FedShiftStrategy):
    """FRAug: FedBN-style model sharing plus the server-held generator G.

    G goes out with the model as ``generator.<key>`` arrays in the same ArrayRecord; the clients
    return their updated G the same way and it is averaged by sample count with the model.
    """

    def __init__(self, *, generator: ArrayRecord, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not len(generator):
            raise ValueError("FRAug needs the initial generator arrays")
        self.generator = generator

    def generator_arrays(self) -> ArrayRecord:
        return self.generator

    def outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        merged: dict[str, Array] = dict(without_keys(arrays, self.local_keys).items())
        merged.update({GENERATOR_PREFIX + k: v for k, v in self.generator.items()})
        return ArrayRecord(array_dict=merged)

    def incoming(self, aggregated: ArrayRecord | None) -> ArrayRecord | None:
        if aggregated is None:
            return None
        gen = {k[len(GENERATOR_PREFIX):]: v for k, v in aggregated.items() if k.startswith(GENERATOR_PREFIX)}
        if set(gen) != set(self.generator.keys()):
            raise ValueError(f"clients returned generator keys {sorted(gen)}, expected {sorted(self.generator.keys())}")
        self.generator = ArrayRecord(array_dict=gen)
        return ArrayRecord(array_dict={k: v for k, v in aggregated.items() if not k.startswith(GENERATOR_PREFIX)})


def make_strategy(name: str, *, num_clients: int, local_keys: Collection[str], proximal_mu: float = 0.0,
                  generator: ArrayRecord | None = None, min_clients: int = 0, **kwargs: Any) -> FedShiftStrategy:
    """Build strategy ``name`` sampling every available client each round; a round starts once
    ``min_clients`` (0: all ``num_clients``) are connected and aggregates the replies it got."""
    need = min_clients or num_clients
    common: dict[str, Any] = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=need,
                                  min_evaluate_nodes=need, min_available_nodes=need, **kwargs)
    if name == "fedavg":
        return FedAvgStrategy(local_keys=local_keys, **common)
    if name == "fedprox":
        return FedProxStrategy(proximal_mu=proximal_mu, local_keys=local_keys, **common)
    if name == "fedbn":
        return FedBNStrategy(local_keys=local_keys, **common)
    if name == "local":
        return LocalOnlyStrategy(local_keys=local_keys, **common)
    if name == "fraug":
        if generator is None:
            raise ValueError("FRAug needs a generator")
        return FRAugStrategy(generator=generator, local_keys=local_keys, **common)
    raise ValueError(f"unknown strategy {name!r}")
