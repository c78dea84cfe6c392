"""``benchmarks/load.py`` at a toy size: a real cloud process, simulated edges, a JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_load_benchmark_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "benchmarks/load.py", "--edges", "3", "--duration", "2", "--warmup", "1",
                           "--interval", "0.5", "--batch", "8", "--image-size", "16", "--method", "tent",
                           "--replay-size", "64", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["edges"] == 3 and row["errors"] == 0 and row["edges_failed"] == 0
    assert row["uploads_per_s"] > 0 and abs(row["samples_per_s"] - 8 * row["uploads_per_s"]) < 0.5
    assert row["upload_latency_ms"]["n"] > 0 and row["updates_received"] > 0
    assert row["cloud_rss_mb_max"] > 0 and row["cloud_threads_max"] > 0 and row["cloud_memory"]
    assert "| 3 |" in proc.stdout  # the table
