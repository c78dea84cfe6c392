"""``benchmarks/edge_runtime.py`` at a toy size: speed, update costs per path, a JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_edge_runtime_benchmark_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "edge_runtime.json"
    proc = subprocess.run([sys.executable, "benchmarks/edge_runtime.py", "--models", "edge_cnn", "--repeats", "1",
                           "--sample-s", "0.02", "--pause-s", "0", "--update-repeats", "1", "--updates-per-round", "2",
                           "--update-settle-s", "0.02", "--build-repeats", "1", "--threads", "1",
                           "--note", "toy", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["note"] == "toy" and "load_average_1m_start" in report["machine"]
    (r,) = report["results"]
    assert r["model"] == "edge_cnn" and r["image_size"] == 32
    assert set(r["speed_vs_fused"]) >= {"onnx_fused", "fedshift_initializers", "fedshift_inputs"}
    assert set(r["speed_vs_fused_paired"]) == set(r["speed_vs_fused"])
    assert set(r["updates"]) == {"sync_python", "background_python", "background_capi", "inputs"}
    for path, u in r["updates"].items():
        assert u["block_ms"]["n"] == 2 and u["in_force_ms"]["median"] is not None, path
        assert u["first_predict_ms"]["median"] >= 0 and u["in_force_ms"]["median"] >= 0, path
    assert r["updates"]["background_capi"]["background_updates"] is True
    assert r["updates"]["sync_python"]["background_updates"] is False
    assert set(r["session_options"]) == {"ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC"}
    assert "| edge_cnn | background_capi |" in proc.stdout  # the update table
