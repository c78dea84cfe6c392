"""``RUN/results.json``: the one file a user opens after ``fedshift run`` — every stage's typed
summary in one place (:class:`RunResults`), gathered from the files the stages wrote.

Also the export stage's own summary (:class:`ExportSummary`, ``RUN/export/deployed.json``): which
strategy's model was exported, after which round, and every file the edges may run, by sha256.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from core.fl_config import FLResult
from protos.contract import file_sha256
from protos.records import Record
from simulations.adapt import AdaptResult


@dataclass(frozen=True)
class ExportedFile:
    sha256: str
    batch_stats: bool  # BatchNorm normalizes with each batch's own statistics


@dataclass(frozen=True)
class ExportSummary(Record):
    SCHEMA = "fedshift.export/1"

    strategy: str  # whose trained model the edges run
    round: int  # the checkpoint's round
    weights: str  # the torch weights the cloud's student starts from (file name under export/)
    files: dict[str, ExportedFile] = field(default_factory=dict)  # ONNX file name under export/ → its facts
    # clients whose own model (local normalization layers) is under export/clients/<id>/
    clients: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if "edge.onnx" not in self.files:
            raise ValueError("the export stage always writes edge.onnx")
        for pid in self.clients:
            if f"clients/{pid}/edge.onnx" not in self.files:
                raise ValueError(f"client {pid} is listed but clients/{pid}/edge.onnx is not")

    def verify(self, folder: Path) -> None:
        """Raise if a listed file is missing or is not the file that was exported."""
        for name, f in self.files.items():
            if file_sha256(folder / name) != f.sha256:
                raise ValueError(f"{folder / name} changed since it was exported")


STAGES_FILE = "stages.json"  # RUN/stages.json: how long each finished stage took


@dataclass(frozen=True)
class StageTime:
    seconds: float
    finished: str  # local time the stage ended, "YYYY-mm-dd HH:MM:SS"

    def __post_init__(self) -> None:
        if not self.seconds >= 0:
            raise ValueError(f"a stage cannot take {self.seconds} s")


def read_stage_times(run: Path) -> dict[str, StageTime]:
    """The stages of ``run`` that finished, in order (empty before the first)."""
    path = run / STAGES_FILE
    if not path.is_file():
        return {}
    return {name: StageTime(**value) for name, value in json.loads(path.read_text()).items()}


def write_stage_times(run: Path, times: Mapping[str, StageTime]) -> Path:
    path = run / STAGES_FILE
    path.write_text(json.dumps({name: asdict(t) for name, t in times.items()}, indent=2))
    return path


@dataclass(frozen=True)
class RunResults(Record):
    SCHEMA = "fedshift.run-results/1"

    scenario: str
    seed: int
    stages: dict[str, StageTime] = field(default_factory=dict)  # the stages that finished, in order
    fl: dict[str, FLResult] = field(default_factory=dict)  # by strategy
    export: ExportSummary | None = None
    adapt: AdaptResult | None = None


def gather(run: Path, scenario: str, seed: int, stages: Mapping[str, StageTime]) -> RunResults:
    """The summaries the stages have written so far (a stage that did not run is absent)."""
    fl = {p.parent.name: FLResult.read(p) for p in sorted((run / "fl").glob("*/results.json"))}
    deployed, adapt = run / "export" / "deployed.json", run / "adapt" / "results.json"
    return RunResults(scenario=scenario, seed=seed, stages=dict(stages), fl=fl,
                      export=ExportSummary.read(deployed) if deployed.is_file() else None,
                      adapt=AdaptResult.read(adapt) if adapt.is_file() else None)
