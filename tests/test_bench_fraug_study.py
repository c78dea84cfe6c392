"""benchmarks/fraug_study.py without training: its cells, the prefix rule, and the paired summary."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from core.fl_config import ClientRound, FLResult, RoundRecord


@pytest.fixture(scope="module")
def study():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fraug_study.py"
    spec = importlib.util.spec_from_file_location("fraug_study_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _result(strategy: str, seed: int, tests: list[float], vals: list[float]) -> FLResult:
    """Two clients with the same numbers: (val, test) of round r = (vals[r-1], tests[r-1])."""
    history = tuple(RoundRecord(r, {n: ClientRound(i, test_accuracy=t, val_accuracy=v) for i, n in
                                    enumerate(("a", "b"))}, mean_accuracy=t, mean_val_accuracy=v)
                    for r, (t, v) in enumerate(zip(tests, vals), 1))
    last = history[-1]
    return FLResult(strategy=strategy, seed=seed, rounds=len(tests), clients=2,
                    per_client_accuracy={n: c.test_accuracy for n, c in last.clients.items()},
                    mean_accuracy=last.mean_accuracy,
                    per_client_val_accuracy={n: c.val_accuracy for n, c in last.clients.items()},
                    mean_val_accuracy=last.mean_val_accuracy, history=history,
                    config={"strategy": strategy, "seed": seed, "rounds": len(tests), "clients": 2})


def test_cells_grid_and_main(study) -> None:
    grid = study.cells("grid", ["digits"], [0, 1, 2])
    assert len(grid) == 6 and {(c.lambda_t, c.lr_aux) for c in grid} == set(study.GRID)
    assert {c.seed for c in grid} == {0} and {c.rounds for c in grid} == {study.GRID_ROUNDS}
    main = study.cells("main", ["digits"], [0, 1])
    per_seed = 2 * len(study.SIZES["digits"]) + 2 * len(study.BASELINE_SIZES["digits"])
    assert len(main) == 2 * per_seed and len({c.key for c in main}) == len(main)
    assert study.prefix_exact(300) and not study.prefix_exact(400)  # λ_max holds up to T = 347
    # size-major, the baseline size first, every seed of a size before the next size
    order = study.cells("main", ["glyph10"], [0, 1, 2])
    sizes = [c.size for c in order]
    assert sizes[0] in study.BASELINE_SIZES["glyph10"]
    assert sizes == sorted(sizes, key=[*dict.fromkeys(sizes)].index)  # each size is one block
    assert {c.seed for c in order if c.size == sizes[0]} == {0, 1, 2}
    assert {(c.strategy, c.seed) for c in order[:4]} == {("fedbn", 0), ("fraug", 0), ("fedavg", 0), ("local", 0)}
    only = study.cells("main", ["glyph10", "digits"], [0], sizes=[30])
    assert {(c.data, c.size) for c in only} == {("glyph10", 30), ("digits", 30)}
    assert [c.data for c in only] == ["glyph10", "glyph10", "digits", "digits"]  # --datasets order


def test_prefix_reports_and_paired_differences(study) -> None:
    fedbn = _result("fedbn", 0, tests=[0.5, 0.6, 0.7, 0.65], vals=[0.5, 0.7, 0.6, 0.6])
    report = study.summarize_run(fedbn, [2, 4])
    assert report["2"]["final"]["mean_accuracy"] == pytest.approx(0.6)
    assert report["4"]["final"]["mean_accuracy"] == pytest.approx(0.65)
    assert report["4"]["best_val"]["mean_accuracy"] == pytest.approx(0.6)  # round 2 had the best validation
    assert report["4"]["best_val"]["rounds"] == {"a": 2, "b": 2}
    fraug = _result("fraug", 0, tests=[0.5, 0.62, 0.7, 0.7], vals=[0.5, 0.8, 0.6, 0.6])
    done = {}
    for strategy, res in (("fedbn", fedbn), ("fraug", fraug)):
        cell = study.Cell("digits", strategy, 30, 0, rounds=4)
        done[cell.key] = {**study.asdict(cell), "key": cell.key, "report": study.summarize_run(res, [2, 4])}
    assert study.paired(done, "digits", 30, "fraug", "fedbn", 4, "best_val") == pytest.approx([0.02])
    assert study.paired(done, "digits", 30, "fraug", "fedbn", 4, "final") == pytest.approx([0.05])
    assert study.paired(done, "digits", 100, "fraug", "fedbn", 4, "final") == []
    assert study.paired(done, "digits", 30, "fraug", "fedbn", 4, "final", domain="b") == pytest.approx([0.05])
    assert study.paired(done, "digits", 30, "fraug", "fedbn", 4, "final", domain="svhn") == []


def test_a_failed_cell_is_logged_and_skipped_the_rest_still_run(tmp_path, caplog) -> None:
    """One cell that raises does not end the study: the others are saved, it is not (so the next
    invocation retries it), and its key comes back; Ctrl-C still stops the loop."""
    from dataclasses import dataclass

    from benchmarks.study_cells import load_done, run_cells

    @dataclass(frozen=True)
    class C:
        key: str

    def run_one(cell: C) -> dict:
        if cell.key == "b":
            raise ValueError("results.json: unknown key")
        return {"key": cell.key, "accuracy": 0.5}

    done: dict = {}
    failed = run_cells([C("a"), C("b"), C("c")], run_one, tmp_path, done, lambda c, r: f"{r['accuracy']}")
    assert failed == ["b"] and set(done) == {"a", "c"} == set(load_done(tmp_path))
    assert "b failed; skipped" in caplog.text and "unknown key" in caplog.text

    def interrupted(cell: C) -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cells([C("d")], interrupted, tmp_path, done, lambda c, r: "")


def test_study_cells_round_trip(tmp_path) -> None:
    from benchmarks.study_cells import load_done, save_cell

    save_cell(tmp_path, "a-seed0", {"key": "a-seed0", "accuracy": 0.5})
    save_cell(tmp_path, "b-seed1", {"key": "b-seed1", "accuracy": 0.25})
    save_cell(tmp_path, "a-seed0", {"key": "a-seed0", "accuracy": 0.75})  # rewritten, not duplicated
    assert load_done(tmp_path) == {"a-seed0": {"key": "a-seed0", "accuracy": 0.75},
                                   "b-seed1": {"key": "b-seed1", "accuracy": 0.25}}
    assert not list(tmp_path.glob(".*.tmp"))


def test_summary_rows_are_paired_per_seed(study) -> None:
    """Two seeds, FRAug 1 and 3 points above FedBN at 300 rounds: +2.0 ± 1.4; FedAvg / local missing."""
    def cell(strategy: str, seed: int, acc: float) -> dict:
        c = study.Cell("glyph10", strategy, 30, seed)
        per_client = {"svhn": acc, "mnist": acc - 0.1}  # sorted in the JSON, not in client order
        report = {str(r): {m: {"mean_accuracy": acc, "mean_val_accuracy": acc, "per_client_accuracy": per_client}
                           for m in ("final", "best_val")} for r in study.ROUNDS}
        return {**study.asdict(c), "key": c.key, "report": report}

    done = {c["key"]: c for c in (cell("fedbn", 0, 0.50), cell("fraug", 0, 0.51),
                                  cell("fedbn", 1, 0.60), cell("fraug", 1, 0.63))}
    table = study.summary(done)
    row = next(line for line in table.splitlines() if line.startswith("| 30 |"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[:4] == ["30", "2", "55.0", "57.0"]
    assert cols[4:7] == ["+2.0 ± 1.4"] * 3 and cols[7] == "+1.0, +3.0" and cols[8:] == ["–", "–"]
    header = table.splitlines().index("| images/client | mnist | svhn |")  # the built-in domain order
    assert table.splitlines()[header + 2] == "| 30 | +1.0, +3.0 (+2.0 ± 1.4) | +1.0, +3.0 (+2.0 ± 1.4) |"


@pytest.fixture(scope="module")
def growth():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fraug_generator_growth.py"
    spec = importlib.util.spec_from_file_location("fraug_growth_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _growth_run(runs: Path, name: str) -> Path:
    """A hand-made FRAug run: g_dist doubles every 10 rounds, a rejected update in round 7 and a
    fall back to chance (10 classes) in round 8 after reaching 60%; in round 7 one client's train
    loss is NaN (skipped) and another's 5·10⁸."""
    run = runs / name
    run.mkdir(parents=True)
    accs = {r: (0.1 if r == 1 else 0.6 if r < 8 else 0.1) for r in range(1, 301)}
    history = [{"round": r, "mean_accuracy": accs[r], "clients": {
        n: {"train_loss": (float("nan") if (n, r) == ("a", 7) else 5e8 if (n, r) == ("b", 7) else 0.5 * k),
            "fraug": {"g_dist": 2 ** (r / 10) * k, "residual_ratio": 0.5,
                      "label_consistency_proto": 0.2 * k}} for n, k in (("a", 1.0), ("b", 3.0))}}
        for r in range(1, 301)]
    (run / "results.json").write_text(json.dumps({"history": history, "config": {"classes": 10}}))
    (run / "run.log").write_text("WARNING server.strategies: round 7: rejected the update of node 1 (partition 0)\n")
    return run


def test_generator_growth_reads_doubling_time_rejections_and_collapse(growth, tmp_path) -> None:
    row = growth.growth(_growth_run(tmp_path, "glyph10-n100-main300-fraug-seed0"))
    assert row["doubling_rounds"] == pytest.approx(10.0)
    assert row["g_dist"]["100"] == pytest.approx(2 * 2 ** 10)  # the clients' mean
    assert (row["first_rejected_round"], row["rejected_rounds"], row["collapsed_at_round"]) == (7, 1, 8)
    assert row["label_consistency_proto"]["300"] == pytest.approx(0.4)
    assert (row["max_train_loss"], row["max_train_loss_round"]) == (5e8, 7)  # the NaN reply is skipped
    assert "| glyph10-n100-main300-fraug-seed0 |" in growth.table([row])
    assert "| 5.0e+08 (7) | 7 | 8 |" in growth.table([row])


def test_generator_growth_keeps_previous_rows_whose_run_folders_are_gone(growth, tmp_path) -> None:
    """A study continued on a fresh machine: the rows of runs finished elsewhere stay in the output,
    a run folder present here replaces its old row, and the table lists all of them by name."""
    runs, out = tmp_path / "runs", tmp_path / "growth.json"
    _growth_run(runs, "glyph10-n100-main300-fraug-seed0")
    stale = {"run": "glyph10-n100-main300-fraug-seed0", "doubling_rounds": 99.0}
    elsewhere = growth.growth(_growth_run(tmp_path / "elsewhere", "digits-n0-main300-fraug-seed0"))
    out.write_text(json.dumps({"runs": [stale, elsewhere]}))
    assert growth.main(["--runs", str(runs), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["runs"]
    assert [r["run"] for r in rows] == ["digits-n0-main300-fraug-seed0", "glyph10-n100-main300-fraug-seed0"]
    assert rows[0] == elsewhere
    assert rows[1]["doubling_rounds"] == pytest.approx(10.0)  # recomputed from the folder, not the stale row
    table = out.with_suffix(".md").read_text()
    assert "| digits-n0-main300-fraug-seed0 |" in table and "| glyph10-n100-main300-fraug-seed0 |" in table


def test_todo_lists_the_cells_left_with_estimates_from_finished_ones(study) -> None:
    """Estimates: the median wall time of finished cells of the same dataset and strategy (scaled
    to the cell's rounds), else of the same strategy, else unknown."""
    done = {k: {"data": d, "strategy": s, "rounds": r, "wall_s": w} for k, (d, s, r, w) in {
        "a": ("digits", "fedbn", 300, 240), "b": ("digits", "fedbn", 300, 300), "c": ("digits", "fedbn", 300, 600),
        "d": ("glyph10", "fraug", 100, 180)}.items()}
    todo = [study.Cell("digits", "fedbn", 30, 0), study.Cell("glyph100", "fraug", 30, 0),
            study.Cell("glyph10", "local", 100, 0)]
    table = study.todo_table(todo, done)
    assert "| digits-n30-main300-fedbn-seed0 | 5 |" in table  # median of 240, 300, 600 s
    assert "| glyph100-n30-main300-fraug-seed0 | 9 |" in table  # the strategy's 180 s over 100 rounds, ×3
    assert "| glyph10-n100-main300-local-seed0 | ? |" in table
    assert table.endswith("3 cells, ≈ 0.2 h (+ 1 without an estimate)")


def test_plot_draws_only_sizes_with_all_three_seeds(study) -> None:
    """A size still running (one seed paired) stays in the tables but not in the plot."""
    def cell(strategy: str, size: int, seed: int, acc: float) -> dict:
        c = study.Cell("glyph10", strategy, size, seed)
        report = {str(r): {m: {"mean_accuracy": acc, "mean_val_accuracy": acc, "per_client_accuracy": {}}
                           for m in ("final", "best_val")} for r in study.ROUNDS}
        return {**study.asdict(c), "key": c.key, "report": report}

    cells = [cell(s, 30, seed, 0.5 + 0.01 * seed + (0.02 if s == "fraug" else 0)) for seed in range(3)
             for s in ("fedbn", "fraug")] + [cell("fedbn", 1000, 0, 0.9), cell("fraug", 1000, 0, 0.95)]
    done = {c["key"]: c for c in cells}
    points = study.plot_points(done, "glyph10", [30, 1000], 300, "best_val")
    assert [s for s, _ in points] == [30]
    assert points[0][1] == pytest.approx([0.02] * 3)
    assert "| 1000 | 1 |" in study.summary(done)
