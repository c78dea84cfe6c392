"""The comparison report from hand-made results (no training)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from core.fl_config import ClientRound, FLResult, RoundRecord
from simulations.fl_compare import markdown_table, plot_accuracy, run_child, summarize


def _result(strategy: str, seed: int, acc: float) -> FLResult:
    def clients(a: float) -> dict[str, ClientRound]:
        return {"mnist": ClientRound(0, test_accuracy=a + 0.05, val_accuracy=a + 0.04),
                "inverse": ClientRound(1, test_accuracy=a - 0.05, val_accuracy=a - 0.06)}

    def mean(a: float, key: str) -> float:
        return sum(getattr(c, key) for c in clients(a).values()) / 2

    history = tuple(RoundRecord(r, clients(acc * r / 3), mean_accuracy=mean(acc * r / 3, "test_accuracy"),
                                mean_val_accuracy=mean(acc * r / 3, "val_accuracy")) for r in (1, 2, 3))
    last = history[-1]
    return FLResult(strategy=strategy, seed=seed, rounds=3, clients=2,
                    per_client_accuracy={n: c.test_accuracy for n, c in last.clients.items()},
                    mean_accuracy=last.mean_accuracy,
                    per_client_val_accuracy={n: c.val_accuracy for n, c in last.clients.items()},
                    mean_val_accuracy=last.mean_val_accuracy, history=history,
                    config={"strategy": strategy, "seed": seed, "rounds": 3, "clients": 2})


def test_summary_table_and_paired_differences(tmp_path: Path) -> None:
    accs = {"fedavg": (0.55, 0.57), "fedbn": (0.78, 0.80), "fraug": (0.79, 0.79), "local": (0.75, 0.74)}
    results = [_result(s, k, a[k]) for s, a in accs.items() for k in (0, 1)]
    summary = summarize(results)
    assert summary.strategies == ("local", "fedavg", "fedbn", "fraug")
    assert summary.table["fedbn"].mean.mean == pytest.approx(0.79)
    assert summary.table["fedbn"].per_domain["inverse"].mean == pytest.approx(0.74)
    assert summary.pair("fraug", "fedbn").test == pytest.approx([0.01, -0.01])
    assert summary.pair("fedbn", "fedavg").test_mean_std.mean == pytest.approx(0.23)
    with pytest.raises(KeyError, match="fedprox"):
        summary.pair("fedprox", "fedavg")
    saved = json.loads(json.dumps(summary.to_json()))
    assert saved["paired"][0]["a"] == "fraug" and saved["paired"][0]["test_mean_std"]["mean"] == pytest.approx(0.0)
    assert saved["table"]["fedbn"]["mean"]["mean"] == pytest.approx(0.79)
    md = markdown_table(replace(summary, command="fedshift fl compare --seeds 0 1"))
    assert "| FedBN | 84.0 ± 1.4 | 74.0 ± 1.4 | **79.0 ± 1.4** | 78.0 ± 1.4 |" in md
    assert "| FRAug − FedBN | +1.0, -1.0 | +0.0 ± 1.4 |" in md
    assert "`fedshift fl compare --seeds 0 1`" in md
    plot_accuracy(results, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 1000


def _hand_made(vals: dict[str, list[tuple[float | None, float]]]) -> FLResult:
    """A run whose client ``name`` had (val, test) accuracies ``vals[name][r-1]`` in round r."""
    rounds = len(next(iter(vals.values())))
    history = []
    for r in range(1, rounds + 1):
        clients = {n: ClientRound(i, val_accuracy=v[r - 1][0], test_accuracy=v[r - 1][1])
                   for i, (n, v) in enumerate(vals.items())}
        tests = [c.test_accuracy for c in clients.values()]
        vs = [c.val_accuracy for c in clients.values()]
        history.append(RoundRecord(r, clients, mean_accuracy=sum(tests) / len(tests),
                                   mean_val_accuracy=None if None in vs else sum(vs) / len(vs)))
    last = history[-1]
    return FLResult(strategy="fedbn", seed=0, rounds=rounds, clients=len(vals),
                    per_client_accuracy={n: c.test_accuracy for n, c in last.clients.items()},
                    mean_accuracy=last.mean_accuracy,
                    per_client_val_accuracy={n: c.val_accuracy for n, c in last.clients.items()},
                    mean_val_accuracy=last.mean_val_accuracy, history=tuple(history),
                    config={"strategy": "fedbn", "seed": 0, "rounds": rounds, "clients": len(vals)})


def test_best_val_picks_each_clients_best_validation_round() -> None:
    """Client a peaks on validation in round 2 (its test there: 0.60, not its best test 0.9);
    client b ties its best validation in rounds 1 and 3 -> the earliest, round 1."""
    run = _hand_made({"mnist": [(0.5, 0.55), (0.8, 0.60), (0.7, 0.90)],
                      "inverse": [(0.6, 0.40), (0.5, 0.70), (0.6, 0.80)]})
    best = run.report("best_val")
    assert best.rounds == {"mnist": 2, "inverse": 1}
    assert best.per_client_accuracy == {"mnist": 0.60, "inverse": 0.40}
    assert best.mean_accuracy == pytest.approx(0.50) and best.mean_val_accuracy == pytest.approx(0.70)
    final = run.report("final")
    assert final.per_client_accuracy == {"mnist": 0.90, "inverse": 0.80} and final.rounds == {"mnist": 3, "inverse": 3}
    md = markdown_table(summarize([run], "best_val"))
    assert "best-validation round" in md and "| FedBN | 60.0 ± 0.0 | 40.0 ± 0.0 | **50.0 ± 0.0** |" in md
    assert "final round" in markdown_table(summarize([run]))
    with pytest.raises(ValueError, match="report mode"):
        run.report("best_test")


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (this sandbox's init may not reap orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_run_child_stops_what_the_child_left_behind(tmp_path: Path) -> None:
    """A child that exits leaving a helper running (as Ray's agents may) gets the helper stopped
    too; a failing child's error names its exit code and shows its log's tail."""
    leaves = ("import subprocess, sys; p = subprocess.Popen(['sleep', '120']); "
              "print('helper', p.pid, flush=True)")
    run_child([sys.executable, "-c", leaves], tmp_path / "run.log")
    pid = int((tmp_path / "run.log").read_text().split()[-1])
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), "the helper the child left behind is still running"
    with pytest.raises(RuntimeError, match=r"exit 3(.|\n)*it went wrong"):
        run_child([sys.executable, "-c", "import sys; print('it went wrong'); sys.exit(3)"], tmp_path / "bad.log")
    with pytest.raises(ValueError, match=".log file"):
        run_child([sys.executable, "-c", "pass"], tmp_path / "run.txt")


def test_run_child_stops_the_child_when_the_launcher_is_terminated(tmp_path: Path) -> None:
    """SIGTERM to the launcher (unwound as SystemExit, as the study does) stops the running child."""
    import signal
    import subprocess

    launcher = ("import signal, sys\nfrom pathlib import Path\nfrom simulations.fl_compare import run_child\n"
                "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
                "run_child([sys.executable, '-c', 'import os, time; print(\"child\", os.getpid(), flush=True); "
                "time.sleep(120)'], Path(sys.argv[1]))\n")
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-c", launcher, str(log)], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 30
    while not (log.is_file() and "child" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(log.read_text().split()[-1])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert _gone(child), "the child outlived its launcher"
