"""The cloud's TensorBoard events under ``OUT/cloud``: one writer, safe from any thread.

What is logged: each learner step's losses, latency, queue, replay and version
(``cloud/<learner>/…``), the stale samples a learner dropped, the cloud's version / upload /
sample rates (``cloud/…_per_s``, at most one point per ``rate_interval_s``) and each edge's
reported metrics (``edge/<id>/…``). Without an output folder every call is a no-op, so callers
never check.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

_LOSS_SUFFIXES = ("loss", "entropy", "kl", "ce")


class CloudTelemetry:
    """TensorBoard scalars of one cloud process (``open`` it, then log from any thread, ``close``)."""

    def __init__(self, rate_interval_s: float) -> None:
        self._rate_interval_s = rate_interval_s
        self._lock = threading.Lock()
        self._writer: Any = None
        self._rate = {"t": time.monotonic(), "versions": 0, "uploads": 0, "samples": 0}

    def open(self, log_dir: Path, info: Mapping[str, Any]) -> None:
        """Write ``config.json`` (``info``) into ``log_dir`` and start its event file."""
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "config.json").write_text(json.dumps(dict(info), indent=2, default=str))
        with self._lock:
            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One point; non-finite values are skipped (TensorBoard cannot plot them)."""
        if self._writer is None or not math.isfinite(float(value)):
            return
        with self._lock:
            if self._writer is not None:
                self._writer.add_scalar(tag, float(value), step)

    def learner_step(self, name: str, step: int, stats: Mapping[str, float], latency_ms: float, *,
                     queue: int, replay: int, version: int) -> None:
        """A learner's step: its losses under ``loss/``, the rest beside them."""
        prefix = f"cloud/{name}"
        for key, value in stats.items():
            self.scalar(f"{prefix}/loss/{key}" if key.endswith(_LOSS_SUFFIXES) else f"{prefix}/{key}", value, step)
        self.scalar(f"{prefix}/step_latency_ms", latency_ms, step)
        self.scalar(f"{prefix}/queue", queue, step)
        self.scalar(f"{prefix}/replay", replay, step)
        self.scalar(f"{prefix}/version", version, step)
        log.debug("learner %s step %d (v%d): %s, %.0f ms", name, step, version,
                  {k: round(v, 4) for k, v in stats.items()}, latency_ms)

    def rates(self, versions: int, uploads: int, samples: int) -> None:
        """Versions, uploads and samples per second since the last point, once per interval
        (the totals so far are given; the rates are this object's to compute)."""
        now = time.monotonic()
        dt = now - self._rate["t"]
        if dt < self._rate_interval_s or dt <= 0:
            return
        last, self._rate = self._rate, {"t": now, "versions": versions, "uploads": uploads, "samples": samples}
        for key, total in (("versions", versions), ("uploads", uploads), ("samples", samples)):
            self.scalar(f"cloud/{key}_per_s", (total - last[key]) / dt, versions)

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
