"""The comparison report from hand-made results (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.fl_compare import markdown_table, plot_accuracy, summarize


def _result(strategy: str, seed: int, acc: float) -> dict:
    per = {"mnist": acc + 0.05, "inverse": acc - 0.05}
    history = [{"round": r, "mean_accuracy": acc * r / 3} for r in (1, 2, 3)]
    return {"strategy": strategy, "seed": seed, "rounds": 3, "clients": 2, "per_client_accuracy": per,
            "mean_accuracy": acc, "mean_val_accuracy": acc - 0.01, "history": history,
            "config": {"rounds": 3, "clients": 2}}


def test_summary_table_and_paired_differences(tmp_path: Path) -> None:
    accs = {"fedavg": (0.55, 0.57), "fedbn": (0.78, 0.80), "fraug": (0.79, 0.79), "local": (0.75, 0.74)}
    results = [_result(s, k, a[k]) for s, a in accs.items() for k in (0, 1)]
    summary = summarize(results)
    assert summary["strategies"] == ["local", "fedavg", "fedbn", "fraug"]
    assert summary["table"]["fedbn"]["mean"][0] == pytest.approx(0.79)
    assert summary["paired"]["fraug-fedbn"]["test"] == pytest.approx([0.01, -0.01])
    md = markdown_table({**summary, "command": "fedshift fl compare --seeds 0 1"})
    assert "| FedBN | 84.0 ± 1.4 | 74.0 ± 1.4 | **79.0 ± 1.4** | 78.0 ± 1.4 |" in md
    assert "| FRAug − FedBN | +1.0, -1.0 | +0.0 ± 1.4 |" in md
    assert "`fedshift fl compare --seeds 0 1`" in md
    plot_accuracy(results, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 1000
