"""simulations.report and the run folder's typed stage times, without running a stage."""

from __future__ import annotations

import json

import pytest

from simulations.report import write_report
from simulations.results import STAGES_FILE, StageTime, gather, read_stage_times, write_stage_times


def test_stage_times_round_trip_in_order_and_refuse_bad_values(tmp_path) -> None:
    assert read_stage_times(tmp_path) == {}
    times = {"data": StageTime(0.5, "2026-12-01 20:00:00"), "fl": StageTime(70.25, "2026-12-01 20:01:10")}
    write_stage_times(tmp_path, times)
    assert list(json.loads((tmp_path / STAGES_FILE).read_text())) == ["data", "fl"]
    assert read_stage_times(tmp_path) == times
    assert gather(tmp_path, "tiny", 0, times).stages == times
    with pytest.raises(ValueError, match="cannot take"):
        StageTime(-1.0, "")
    (tmp_path / STAGES_FILE).write_text(json.dumps({"fl": {"seconds": 1.0}}))  # a misspelt / missing field is an error
    with pytest.raises(TypeError):
        read_stage_times(tmp_path)


def test_report_of_a_folder_with_only_stage_times(tmp_path) -> None:
    write_stage_times(tmp_path, {"data": StageTime(1.5, "t"), "fl": StageTime(2.5, "t")})
    report = write_report(tmp_path).read_text()
    assert "(no federated results in this folder)" in report and "(no adaptation results in this folder)" in report
    assert "| data | 1.5 |" in report and "| fl | 2.5 |" in report and "| **total** | 4.0 |" in report
