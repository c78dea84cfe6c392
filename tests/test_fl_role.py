"""The FL role's contract: ``fedshift fl`` reads one typed config (fl.toml / flags) and its runs
write one typed summary (FLResult); both refuse bad input with a clear message. No training."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.fl_config import ClientRound, FLConfig, FLResult, RoundRecord
from protos.config import load_config
from simulations.cli import main
from simulations.fl_role import FLRun, SimulationResources


def _print_config(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(["fl", *argv, "--print-config"]) == 0
    return capsys.readouterr().out


def test_print_config_round_trips_through_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _print_config(capsys, "--strategy", "fedbn", "--rounds", "3", "--seed", "1", "--out", str(tmp_path / "r"),
                         "--num-cpus", "2", "--set", "model-width=0.5", "--no-tensorboard")
    path = tmp_path / "fl.toml"
    path.write_text(text)
    assert _print_config(capsys, "--config", str(path)) == text
    run = load_config(FLRun, path)
    assert run == FLRun(fl=FLConfig(strategy="fedbn", rounds=3, seed=1, out_dir=str(tmp_path / "r"), model_width=0.5,
                                    tensorboard=False), simulation=SimulationResources(num_cpus=2))
    assert run.to_toml() == text


def test_a_flag_overrides_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = FLRun(fl=FLConfig(strategy="fedprox", rounds=7, lr=0.1)).write(tmp_path / "fl.toml")
    text = _print_config(capsys, "--config", str(path), "--rounds", "2", "--cpus-per-client", "2")
    (tmp_path / "out.toml").write_text(text)
    run = load_config(FLRun, tmp_path / "out.toml")
    assert (run.fl.strategy, run.fl.rounds, run.fl.lr, run.simulation.cpus_per_client) == ("fedprox", 2, 0.1, 2)


def test_unknown_or_bad_settings_are_refused_with_their_name(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[fl]\nroundz = 3\n")
    assert main(["fl", "--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'roundz' in [fl]" in err and "valid keys: strategy, seed, rounds" in err
    assert str(bad) in err
    bad.write_text("[fl]\nrounds = \"three\"\n")
    assert main(["fl", "--config", str(bad)]) == 2
    assert "fl.rounds: expected int" in capsys.readouterr().err
    assert main(["fl", "--set", "roundz=3"]) == 2
    assert "unknown key 'roundz'; valid keys: strategy" in capsys.readouterr().err
    assert main(["fl", "--rounds", "2", "--set", "rounds=3"]) == 2  # one setting, given twice
    assert "--set rounds" in capsys.readouterr().err
    assert main(["fl", "compare", "--strategy", "fedbn", "--out", str(tmp_path)]) == 2
    assert "--strategies" in capsys.readouterr().err
    assert main(["fl", "--seeds", "1"]) == 2
    assert "compare" in capsys.readouterr().err


# ------------------------------------------------------------------------------ FLResult


def _result(acc: tuple[float, float] = (0.6, 0.8), rounds: int = 2, strategy: str = "fedbn", seed: int = 0) -> FLResult:
    clients = {"mnist": ClientRound(0, test_accuracy=acc[0], val_accuracy=acc[0]),
               "inverse": ClientRound(1, test_accuracy=acc[1], val_accuracy=acc[1])}
    mean = (acc[0] + acc[1]) / 2
    history = tuple(RoundRecord(r, clients, bytes_down=10, bytes_up=20, mean_accuracy=mean, mean_val_accuracy=mean,
                                round_seconds=0.5, fraug={"label_consistency_real": None} if r == 1 else None)
                    for r in range(1, rounds + 1))
    return FLResult(strategy=strategy, seed=seed, rounds=rounds, clients=2,
                    per_client_accuracy={"mnist": acc[0], "inverse": acc[1]}, mean_accuracy=mean,
                    per_client_val_accuracy={"mnist": acc[0], "inverse": acc[1]}, mean_val_accuracy=mean,
                    history=history, config=FLConfig(strategy=strategy, seed=seed, rounds=rounds,
                                                     clients=2).to_run_config())


def test_fl_result_round_trips_through_json(tmp_path: Path) -> None:
    r = _result()
    assert FLResult.from_json(r.to_json()) == r
    assert FLResult.read(r.write(tmp_path / "results.json")) == r
    raw = json.loads(r.to_json())
    assert raw["schema"] == "fedshift.fl-result/1"
    assert {"strategy", "seed", "mean_accuracy", "mean_val_accuracy", "per_client_accuracy", "history",
            "config"} <= set(raw)
    assert raw["history"][0]["clients"]["mnist"]["test_accuracy"] == 0.6
    assert r.complete and r.fl_config.strategy == "fedbn"


def _tampered(r: FLResult, edit) -> str:
    raw = json.loads(r.to_json())
    edit(raw)
    return json.dumps(raw)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(mean_accuracy=0.9), "mean 0.9 is not the mean"),
    (lambda d: d["per_client_accuracy"].update(mnist=1.5), "outside \\[0, 1\\]"),
    (lambda d: d["history"].reverse(), "history rounds must increase"),
    (lambda d: d["history"][1]["clients"]["mnist"].update(test_accuracy=0.1), "not the mean"),
    (lambda d: d.update(seed=4), "seed is 4 but config says 0"),
    (lambda d: d["config"].update(roundz=2), "unknown key 'roundz'"),
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
    (lambda d: d.update(schema="fedshift.fl-result/0"), "schema"),
    (lambda d: d.update(mean_accuracy="0.7"), "mean_accuracy"),
])
def test_a_broken_fl_result_is_refused(edit, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FLResult.from_json(_tampered(_result(), edit))


def test_the_final_numbers_are_the_last_rounds() -> None:
    r = _result()
    last = dataclasses.replace(r.history[-1], clients={"mnist": ClientRound(0, test_accuracy=0.2),
                                                       "inverse": ClientRound(1, test_accuracy=0.4)},
                               mean_accuracy=0.3 + 1e-12)
    with pytest.raises(ValueError, match="differs from the last round"):
        dataclasses.replace(r, history=(r.history[0], last))


# ------------------------------------------------------------------------------ compare


def test_compare_hands_each_run_a_role_file_and_reuses_finished_runs(tmp_path: Path, monkeypatch) -> None:
    import simulations.fl_compare as fc

    started: list[FLRun] = []

    def fake_run_one(cmd: list[str], log_path: Path) -> None:  # a child that "trains" instantly
        assert cmd[-2] == "--config"
        run = load_config(FLRun, cmd[-1])
        started.append(run)
        acc = (0.5 + 0.01 * run.fl.seed, 0.7)
        res = _result(acc, rounds=run.fl.rounds, strategy=run.fl.strategy, seed=run.fl.seed)
        res = dataclasses.replace(res, config=run.fl.to_run_config())
        res.write(Path(run.fl.out_dir) / "results.json")

    monkeypatch.setattr(fc, "run_child", fake_run_one)
    base = FLRun(fl=FLConfig(rounds=2, clients=2, lr=0.02), simulation=SimulationResources(cpus_per_client=1))
    table = fc.run_comparison(base, strategies=["fedavg", "fedbn"], seeds=[0, 1], out=tmp_path)
    assert [(r.fl.strategy, r.fl.seed, r.fl.lr) for r in started] == [
        ("fedavg", 0, 0.02), ("fedbn", 0, 0.02), ("fedavg", 1, 0.02), ("fedbn", 1, 0.02)]
    assert started[0].fl.out_dir == str(tmp_path / "fedavg-seed0")
    assert "| FedBN |" in table.read_text() and "--config" in table.read_text()
    assert load_config(FLRun, tmp_path / "fl.toml") == base
    started.clear()
    fc.run_comparison(base, strategies=["fedavg", "fedbn"], seeds=[0, 1], out=tmp_path)
    assert started == []  # every run reused
    fc.run_comparison(dataclasses.replace(base, fl=base.fl.replace(lr=0.03)), strategies=["fedbn"], seeds=[0],
                      out=tmp_path)
    assert [r.fl.lr for r in started] == [0.03]  # other settings: rerun


def test_the_comparison_does_not_import_the_command_line() -> None:
    code = ("import sys, simulations.fl_compare, simulations.fl_sim; "
            "assert not [m for m in sys.modules if m.startswith('simulations.commands')], sys.modules.keys(); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
