"""End to end in Flower's simulation engine: 2 clients, 2 rounds, then a resume to round 3."""

from __future__ import annotations

import json
import os
import logging
from pathlib import Path

import pytest

from core.fl_config import FLConfig, FLResult
from protos.config import load_config
from server.recorder import load_checkpoint
from simulations.fl_role import FLRun, SimulationResources

# round-timeout-s: short, so that a round stuck on a loaded machine fails the test within minutes
# (a runtime that fails to start no longer leaves the ServerApp waiting: tests/test_fl_sim_failures.py).
SMALL = {"clients": 2, "rounds": 2, "model-width": 0.125, "image-size": 16, "train-per-client": 40,
         "batch-size": 16, "round-timeout-s": 120}


def _run(**run_config: object) -> FLRun:
    return FLRun(fl=FLConfig.from_run_config({**SMALL, **run_config}), simulation=SimulationResources(num_cpus=2))


@pytest.fixture(scope="module")
def fraug_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulations.fl_sim import run_fl_simulation

    out = tmp_path_factory.mktemp("fl") / "fraug"
    result = run_fl_simulation(_run(strategy="fraug", seed=1, **{"out-dir": str(out)}))
    assert result == FLResult.read(out / "results.json")
    return out


def test_results_json_schema(fraug_run: Path) -> None:
    results = FLResult.read(fraug_run / "results.json")
    assert (results.strategy, results.seed, results.rounds, results.clients) == ("fraug", 1, 2, 2)
    assert results.complete and set(results.per_client_accuracy) == {"mnist", "inverse"}
    assert all(0.0 <= v <= 1.0 for v in results.per_client_accuracy.values())
    assert results.mean_accuracy == pytest.approx(sum(results.per_client_accuracy.values()) / 2)
    assert [h.round for h in results.history] == [1, 2]
    h = results.history[-1]
    assert h.bytes_down > 0 and h.bytes_up > 0
    assert 0.0 <= h.fraug["label_consistency_real"] <= 1.0
    assert results.config["strategy"] == "fraug" and results.config["model-width"] == 0.125
    # the key names readers of the plain JSON use are kept
    raw = json.loads((fraug_run / "results.json").read_text())
    assert raw["schema"] == FLResult.SCHEMA and raw["history"][-1]["mean_accuracy"] == h.mean_accuracy
    # the resolved role config is written beside the results
    assert load_config(FLRun, fraug_run / "fl.toml").fl.strategy == "fraug"


def test_tensorboard_tags_are_readable(fraug_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(fraug_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("accuracy/mean", "accuracy/mnist", "loss/inverse", "bytes/down", "bytes/up",
                "fraug/label_consistency_real/mean", "fraug/g_ce/mnist", "fraug/t_dist/inverse"):
        assert tag in tags, f"missing {tag}; have {sorted(tags)}"
    assert [e.step for e in acc.Scalars("accuracy/mean")] == [1, 2]


def test_checkpoint_and_resume(fraug_run: Path) -> None:
    from simulations.fl_sim import run_fl_simulation

    ckpt = load_checkpoint(fraug_run)
    assert ckpt.round == 2 and ckpt.generator and ckpt.model
    resumed = run_fl_simulation(_run(rounds=3, strategy="fraug", seed=1, **{
        "out-dir": str(fraug_run), "resume": str(fraug_run / "checkpoint.pt")}))
    assert [h.round for h in resumed.history] == [1, 2, 3]
    assert resumed.resumed_from_round == 2
    assert load_checkpoint(fraug_run).round == 3


@pytest.mark.slow  # three simulations in a row, after the module's two: Ray's start-up timed out once here
def test_stopped_and_resumed_equals_uninterrupted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11: a run stopped after round 1 and resumed equals one that never stopped -- every
    client's numbers in every round and the final model, exactly (FRAug: local BN, RTNet,
    prototypes and three optimizers' momentum all live in the clients' Context.state)."""
    import torch

    from simulations.fl_sim import run_fl_simulation

    caplog.set_level(logging.INFO)
    common = dict(rounds=3, strategy="fraug", seed=3)
    whole = run_fl_simulation(_run(**common, **{"out-dir": str(tmp_path / "whole")}))
    part = run_fl_simulation(_run(**common, **{"out-dir": str(tmp_path / "parts"), "stop-at": 1}))
    assert [h.round for h in part.history] == [1] and not part.complete
    stopped = load_checkpoint(tmp_path / "parts")
    assert stopped.round == 1 and set(stopped.client_state) == {0, 1}
    assert any(k.startswith("fraug-rtnet/") for k in stopped.client_state[0])
    resumed = run_fl_simulation(_run(**common, **{"out-dir": str(tmp_path / "parts"),
                                                  "resume": str(tmp_path / "parts")}))
    assert resumed.complete and resumed.resumed_from_round == 1
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert a.clients == b.clients, f"round {a.round} differs"
    assert any(r.name == "server.recorder" for r in caplog.records)  # the server's log is seen here
    rejected = [r.getMessage() for r in caplog.records if "rejected the update" in r.getMessage()]
    assert not rejected, rejected  # honest clients' updates are all averaged (a wrong check once dropped them)
    final_a, final_b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "parts")
    for key, value in final_a.model.items():
        assert torch.equal(value, final_b.model[key]), key
    for pid, state in final_a.client_state.items():
        for key, value in state.items():
            assert torch.equal(value, final_b.client_state[pid][key]), (pid, key)


def test_a_client_failing_during_a_round_does_not_stop_the_run(tmp_path: Path) -> None:
    """Issue 12: a client that dies in round 2 (its ClientApp raises) costs that round its update;
    the server averages the other's, and the run goes on to the end with both clients."""
    import warnings

    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from client.app import handle_evaluate, handle_train_evaluating_received
    from server.app import make_server_app
    from simulations.fl_sim import FLOWER_ENV, backend_config

    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    cfg = FLConfig.from_run_config({**SMALL, "rounds": 3, "strategy": "fedbn", "out-dir": str(tmp_path),
                                    "tensorboard": False})
    overrides = cfg.to_run_config()
    app = ClientApp()

    @app.train()
    def train(msg, context):  # the real handler, but partition 1 dies in round 2
        if int(context.node_config["partition-id"]) == 1 and int(msg.content["config"]["server-round"]) == 2:
            raise RuntimeError("client 1 dies in round 2")
        return handle_train_evaluating_received(msg, context, FLConfig.from_run_config(overrides))

    @app.evaluate()
    def evaluate(msg, context):
        return handle_evaluate(msg, context, FLConfig.from_run_config(overrides))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=make_server_app(overrides), client_app=app, num_supernodes=2,
                       backend_config=backend_config(2, 1))
    result = FLResult.read(tmp_path / "results.json")
    assert result.complete and [h.round for h in result.history] == [1, 2, 3]
    round2 = result.history[1].clients  # round 2: only the living client's update was averaged
    assert round2["mnist"].train_loss is not None
    assert "inverse" not in round2 or round2["inverse"].train_loss is None
    assert set(result.per_client_accuracy) == {"mnist", "inverse"}  # both are back by the end
    assert all(v is not None for v in result.per_client_accuracy.values())


def test_run_env_scopes_the_thread_count_to_one_run(monkeypatch) -> None:
    """Each run's workers get that run's `threads` (not the first run's); the user's value wins."""
    from simulations.fl_sim import FLOWER_ENV, run_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for threads in (3, 1):
        with run_env(threads):
            assert os.environ["OMP_NUM_THREADS"] == str(threads)
            assert all(k in os.environ for k in FLOWER_ENV)
        assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with run_env(2):
        assert os.environ["OMP_NUM_THREADS"] == "7"
    assert os.environ["OMP_NUM_THREADS"] == "7"
