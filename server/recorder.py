"""What a federated run leaves behind: TensorBoard events, per-round history, results.json (an
:class:`~core.fl_config.FLResult`) and checkpoints — all under one run directory.

The strategy reports each round's per-client replies here; nothing in it talks to Flower, so the
same recorder serves the simulation and the deployment engine.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from core.fl_config import EVAL_METRICS, FRAUG_METRIC_PREFIX, TRAIN_METRICS, FLConfig, FLResult, RoundRecord
from protos.config import from_mapping

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class Checkpoint:
    """A global model (full state dict) + generator after ``round`` rounds."""

    model: dict[str, torch.Tensor]
    generator: dict[str, torch.Tensor] | None
    round: int
    config: dict[str, Any]
    # local normalization layers (FedBN / FRAug) averaged over clients by sample count: what an
    # exported model uses in place of ``model``'s never-aggregated ones
    deploy_norm: dict[str, torch.Tensor] | None = None
    # each client's own local normalization layers (partition id -> tensors): the personalised
    # model FedBN trains, which the edge serving that client's domain runs
    client_norm: dict[int, dict[str, torch.Tensor]] | None = None
    # each client's whole Context.state (partition id -> packed arrays, client.app.pack_state):
    # restored into the clients on resume, so a resumed run equals an uninterrupted one
    client_state: dict[int, dict[str, torch.Tensor]] | None = None


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write atomically (tmp + rename), so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": ckpt.model, "generator": ckpt.generator, "round": ckpt.round,
                "config": ckpt.config, "deploy_norm": ckpt.deploy_norm, "client_norm": ckpt.client_norm,
                "client_state": ckpt.client_state}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only``: no code runs)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict) or not {"model", "round"} <= set(raw):
        raise ValueError(f"{path} is not a fedshift FL checkpoint")
    return Checkpoint(model=raw["model"], generator=raw.get("generator"), round=int(raw["round"]),
                      deploy_norm=raw.get("deploy_norm"),
                      client_norm={int(k): v for k, v in raw["client_norm"].items()} if raw.get("client_norm") else None,
                      client_state=({int(k): v for k, v in raw["client_state"].items()}
                                    if raw.get("client_state") else None),
                      config=dict(raw.get("config") or {}))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values, or None when one is missing (a mean over some clients would mislead)."""
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "n/a"


class RunRecorder:
    """Collects per-round, per-client metrics; writes TensorBoard scalars and results.json."""

    def __init__(self, out_dir: Path, cfg: FLConfig, *, start_round: int = 0,
                 previous_history: tuple[RoundRecord, ...] | list[RoundRecord] = ()) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.start_round = start_round
        self.history: list[RoundRecord] = list(previous_history)
        self._current: dict[str, Any] = {}
        self._writer: Any = None
        self._t0 = time.perf_counter()
        self._t_round = self._t0
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        (self.out_dir / "config.json").write_text(json.dumps(cfg.to_run_config(), indent=2) + "\n")

    # ------------------------------------------------------------------ per round
    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None and math.isfinite(float(value)):
            self._writer.add_scalar(tag, float(value), step)

    def _entry(self, rnd: int) -> dict[str, Any]:
        if self._current.get("round") != rnd:
            self._current = {"round": rnd, "clients": {}, "bytes_down": 0, "bytes_up": 0}
        return self._current

    def train_round(self, rnd: int, per_client: Mapping[int, Mapping[str, float]], bytes_down: int,
                    bytes_up: int) -> None:
        """Local-training metrics of each client (loss, FRAug losses, label consistency)."""
        entry = self._entry(rnd)
        entry["bytes_down"] += int(bytes_down)
        entry["bytes_up"] += int(bytes_up)
        fraug_means: dict[str, list[float]] = {}
        for pid, metrics in sorted(per_client.items()):
            name = self.cfg.client_label(pid)
            client = entry["clients"].setdefault(name, {"partition_id": int(pid)})
            for field, key in TRAIN_METRICS.items():  # a reply without them is recorded as not reported
                client[field] = _finite(metrics.get(key, float("nan")))
            self._scalar(f"train_loss/{name}", metrics.get(TRAIN_METRICS["train_loss"], float("nan")), rnd)
            fr = {k[len(FRAUG_METRIC_PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(FRAUG_METRIC_PREFIX)}
            if fr:
                client["fraug"] = {k: _finite(v) for k, v in fr.items()}
                for k, v in fr.items():
                    self._scalar(f"fraug/{k}/{name}", v, rnd)
                    fraug_means.setdefault(k, []).append(v)
        if fraug_means:
            entry["fraug"] = {k: _finite(float(np.mean(v))) for k, v in fraug_means.items()}
            for k, v in entry["fraug"].items():
                if v is not None:
                    self._scalar(f"fraug/{k}/mean", v, rnd)

    def eval_round(self, rnd: int, per_client: Mapping[int, Mapping[str, float]], bytes_down: int,
                   bytes_up: int) -> RoundRecord:
        """Each client's model (with its local parts) on its own val/test split; closes the round."""
        entry = self._entry(rnd)
        entry["bytes_down"] += int(bytes_down)
        entry["bytes_up"] += int(bytes_up)
        for pid, metrics in sorted(per_client.items()):
            name = self.cfg.client_label(pid)
            client = entry["clients"].setdefault(name, {"partition_id": int(pid)})
            for field, key in EVAL_METRICS.items():
                client[field] = _finite(metrics[key])
            self._scalar(f"accuracy/{name}", metrics[EVAL_METRICS["test_accuracy"]], rnd)
            self._scalar(f"loss/{name}", metrics[EVAL_METRICS["test_loss"]], rnd)
            self._scalar(f"val_accuracy/{name}", metrics[EVAL_METRICS["val_accuracy"]], rnd)
        clients = entry["clients"].values()
        entry["mean_accuracy"] = _mean([c.get("test_accuracy") for c in clients])
        entry["mean_val_accuracy"] = _mean([c.get("val_accuracy") for c in clients])
        now = time.perf_counter()
        entry["round_seconds"] = now - self._t_round
        self._t_round = now
        record = from_mapping(RoundRecord, entry)  # checks the round's invariants
        for tag, value in (("accuracy/mean", record.mean_accuracy), ("val_accuracy/mean", record.mean_val_accuracy)):
            if value is not None:
                self._scalar(tag, value, rnd)
        self._scalar("bytes/down", record.bytes_down, rnd)
        self._scalar("bytes/up", record.bytes_up, rnd)
        self.history.append(record)
        self._current = {}
        if self._writer is not None:
            self._writer.flush()
        fr = record.fraug or {}
        log.info("%s round %d/%d: mean acc %s (val %s)%s, %.1f KB down / %.1f KB up, %.1fs",
                 self.cfg.run_name, rnd, self.cfg.rounds, _fmt(record.mean_accuracy), _fmt(record.mean_val_accuracy),
                 f", label consistency {fr['label_consistency_real']:.2f}/{fr['label_consistency_proto']:.2f}"
                 if fr.get("label_consistency_real") is not None and fr.get("label_consistency_proto") is not None
                 else "", record.bytes_down / 1e3, record.bytes_up / 1e3, record.round_seconds)
        return record

    # ------------------------------------------------------------------ end of run
    def results(self) -> FLResult:
        """The run's result so far (final = last recorded round)."""
        last = self.history[-1] if self.history else RoundRecord(round=1)
        return FLResult(
            strategy=self.cfg.strategy,
            seed=self.cfg.seed,
            rounds=self.cfg.rounds,
            clients=self.cfg.clients,
            per_client_accuracy={name: c.test_accuracy for name, c in last.clients.items()},
            mean_accuracy=last.mean_accuracy,
            per_client_val_accuracy={name: c.val_accuracy for name, c in last.clients.items()},
            mean_val_accuracy=last.mean_val_accuracy,
            history=tuple(self.history),
            config=self.cfg.to_run_config(),
            resumed_from_round=self.start_round,
            wall_seconds=time.perf_counter() - self._t0,
        )

    def write_results(self) -> Path:
        """Write results.json (atomically)."""
        return self.results().write(self.out_dir / RESULTS_FILE)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
