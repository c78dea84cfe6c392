"""``benchmarks/edge_footprint.py`` at a toy size: one model, one repeat, every JSON field there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_edge_footprint_benchmark_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "edge_footprint.json"
    proc = subprocess.run([sys.executable, "benchmarks/edge_footprint.py", "--models", "edge_cnn", "--repeats", "1",
                           "--predictions", "2", "--batch", "8", "--threads", "1", "2", "--note", "toy",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["note"] == "toy" and report["machine"]["onnxruntime"]
    (r,) = report["results"]
    assert r["model"] == "edge_cnn" and r["image_size"] == 32 and r["parameters"] > 0
    assert r["model_file_bytes"] > 4 * r["parameters"] * 0.9 and r["update_bytes"] > 4 * r["norm_floats"]
    assert 0 < r["rss_after_load_mb"] <= r["rss_peak_mb"] and r["rss_after_predictions_mb"] > 0
    assert r["startup_s"] > sum(r["startup_split_s"].values()) > 0  # process start -> first logits
    assert set(r["img_per_s"]) == {"1", "2"} and all(v > 0 for v in r["img_per_s"].values())
    assert r["torch_imported"] is False  # the child asserts it too
    assert r["backend"] in ("capi", "python")
    if r["backend"] == "capi":
        assert r["ort_python_binding_loaded"] is False
    install = report["install"]
    names = {d["name"].lower() for d in install["distributions"]}
    assert {"numpy", "onnxruntime", "grpcio", "protobuf"} <= names and "torch" not in names
    assert install["base_install_bytes"] == install["dependencies_bytes"] + install["fedshift_wheel_code_bytes"]
    assert 0 < install["fedshift_edge_code_bytes"] < install["fedshift_wheel_code_bytes"]
    assert "RECORD" in install["method"]
    assert "| edge_cnn |" in proc.stdout and "base install:" in proc.stdout  # the table
