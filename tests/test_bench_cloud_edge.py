"""Smoke test of ``benchmarks/cloud_edge.py --quick``: it runs end to end and its JSON is complete
and consistent. Structure and arithmetic only — never speeds (the machine is shared and noisy).

Run as a subprocess so its spawned edge processes never inherit pytest's state."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIXELS = 32 * 32 * 3


def test_cloud_edge_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "cloud_edge.json"
    proc = subprocess.run([sys.executable, "benchmarks/cloud_edge.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| batch |" in proc.stdout and "| edges |" in proc.stdout and "| model |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == "cloud_edge" and report["wall_s"] > 0
    settings, machine, results = report["settings"], report["machine"], report["results"]
    assert settings["quick"] is True and settings["edges"] == [1, 2] and settings["latency_batches"] == [1, 16, 64]
    assert machine["cpus"] >= 1 and len(machine["loadavg_before"]) == 3
    kinds = settings["kinds"]
    assert kinds == ["ack", "cloud"]

    # upload round trips: every server x batch, positive, p90 not below the median
    for kind in kinds:
        for n in (1, 16, 64):
            r = results["upload_latency"][kind][str(n)]
            assert r["batch"] == n and r["uploads_per_repeat"] == settings["latency_uploads"]
            assert 0 < r["median_ms"] <= r["p90_ms"]
            assert len(r["repeat_median_ms"]) == settings["repeats"]

    # sustained uploads: every request carries sustain_batch samples, all accepted
    batch = settings["sustain_batch"]
    for kind in kinds:
        for edges in (1, 2):
            r = results["throughput"][kind][str(edges)]
            assert r["edges"] == edges and r["requests_per_s"] > 0
            assert math.isclose(r["samples_per_s"], batch * r["requests_per_s"])
            for rep in r["repeats"]:
                assert len(rep["per_edge_requests"]) == edges and all(k >= 0 for k in rep["per_edge_requests"])
                assert rep["samples"] == batch * rep["requests"] == batch * sum(rep["per_edge_requests"])

    # update latency: every upload produced one version, each applied once at the edge
    upd = results["update_latency"]
    assert upd["updates"] == upd["versions_applied"] == upd["final_version"] == settings["updates"]
    assert upd["update_latency"]["count"] == upd["apply"]["count"] == settings["updates"]
    for key in ("update_latency", "apply", "upload_to_applied"):
        assert 0 < upd[key]["median_ms"] <= upd[key]["max_ms"]

    # bytes: payloads are arithmetic; serialized sizes differ from them only by small framing
    for n in (1, 16, 64):
        b = results["bytes"]["upload"][str(n)]
        assert b["payload_bytes_uint8"] == n * PIXELS
        assert b["payload_bytes_float32"] == 4 * n * PIXELS
        assert b["request_bytes_uint8_cloudclient"] == b["request_bytes_uint8"]  # the mirror is exact
        assert b["overhead_bytes_uint8"] == b["request_bytes_uint8"] - n * PIXELS > 0
        assert 0 <= b["request_bytes_float32"] - b["request_bytes_uint8"] - 3 * n * PIXELS <= 4  # varint lengths
        assert math.isclose(b["per_sample_uint8"], b["request_bytes_uint8"] / n)
        assert math.isclose(b["float32_over_uint8"], b["request_bytes_float32"] / b["request_bytes_uint8"])
        assert 3.9 < b["float32_over_uint8"] < 4.0
    for name in ("edge_cnn", "teacher_resnet"):
        u = results["bytes"]["update"][name]
        assert u["update_payload_bytes"] == 4 * u["norm_floats"] < u["update_bytes"]
        assert u["model_param_bytes_fp32"] == 4 * u["parameters"] < u["model_state_bytes_fp32"]
        assert math.isclose(u["update_over_model_params"], u["update_bytes"] / u["model_param_bytes_fp32"])
        assert u["update_bytes"] < u["model_param_bytes_fp32"]
    # what the edge received over the wire is the message the bytes section serialized
    assert abs(upd["bytes_per_update_received"] - results["bytes"]["update"]["edge_cnn"]["update_bytes"]) <= 4

    # cloud learning: every upload learnt, one student step per cloud batch at least, all variants
    assert "Cloud learning" in proc.stdout
    learn, per_edge = results["learning"], settings["learn_samples"] // 16 * 16
    for variant in ("before", "channels_last", "after"):
        for edges in (1, 2):
            r = learn[variant][str(edges)]
            assert (r["threads"], r["channels_last"]) == {"before": (1, False), "channels_last": (1, True),
                                                          "after": (settings["learn_threads"], True)}[variant]
            for rep in r["repeats"]:
                assert rep["steps"] >= edges * per_edge // settings["cloud_batch"]
                assert math.isclose(rep["uploads_learnt_per_s"] * rep["wall_s"], edges * per_edge)
            assert r["steps_per_s"] > 0
        assert learn["before"]["1"]["speedup_vs_before"] == 1.0


def _study(name: str):
    """benchmarks/cema_study.py as a module (it is a script, not a package member)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cema_study.py"
    spec = importlib.util.spec_from_file_location(name, path)
    study = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = study
    spec.loader.exec_module(study)
    return study


def test_cema_study_tune_cells_are_seed_zeros_whatever_the_seeds() -> None:
    study = _study("cema_study_under_test")
    cells = study.cells("tune", classes=[100], severities=[5], protocols=["reset"], norms=["batch"], seeds=[1, 2])
    assert {c.seed for c in cells} == {0} and len(cells) == len(study.LRS)
    later = study.Cell(100, 5, "reset", "batch", "cema", seed=2)
    done = {c.key: {"accuracy": 0.1 * i} for i, c in enumerate(cells)}
    assert study.tuned_lr(later, done) == study.LRS[-1]  # the best validation accuracy wins


def test_cema_study_reuses_one_lr_grid_and_keeps_the_15_corruption_rows_apart() -> None:
    study = _study("cema_study_under_test2")
    # the grid for severity 3 / continual is the severity-5 reset one: no new tune cells, same keys
    tune = study.cells("tune", classes=[10], severities=[3, 5], protocols=["reset", "continual"],
                       norms=["running"], seeds=[0])
    assert len(tune) == len(study.LRS) and {c.group for c in tune} == {"glyph10-sev5-reset-running"}
    done = {c.key: {"accuracy": 0.5 - abs(c.lr - 1e-3)} for c in tune}
    headline = study.Cell(10, 3, "continual", "running", "cema", seed=1, cset="all")
    assert study.tuned_lr(headline, done) == 1e-3
    # the 15-corruption rows are their own group (their keys never overwrite the subset's)
    assert headline.group == "glyph10-sev3-continual-running-all15"
    assert study.Cell(10, 3, "continual", "running", "cema", seed=1).group == "glyph10-sev3-continual-running"
    # pruning by label keeps exactly the named cells, per seed
    kept = study.cells("selection", classes=[10], severities=[5], protocols=["reset"], norms=["running"],
                       seeds=[0, 1], only=["cema", "random@cema", "eata budget 25%"])
    assert sorted(c.label for c in kept) == sorted(["cema", "random@cema", "eata budget 25%"] * 2)


def test_cema_study_authors_preset_is_its_own_untuned_group() -> None:
    from argparse import Namespace

    import pytest

    study = _study("cema_study_under_test3")
    cells = study.cells("selection", classes=[100], severities=[5], protocols=["reset"], norms=["running"],
                        seeds=[0], preset="authors", only=["cema"])
    assert [c.group for c in cells] == ["glyph100-sev5-reset-running-authors"]
    args = Namespace(corruptions=list(study.SUBSET), samples=5000, cell_timeout=60.0, cloud_threads=1)
    cema = study.adapt_config(cells[0], args, None, None).cloud.cema  # no lr: the authors' own constants
    assert (cema.batch_size, cema.student_lr, cema.teacher_lr, cema.replay_capacity) == (32, 2.5e-3, 2.5e-4, 10000)
    with pytest.raises(ValueError, match="no lr grid"):
        study.cells("tune", classes=[100], severities=[5], protocols=["reset"], norms=["running"], seeds=[0],
                    preset="authors")
