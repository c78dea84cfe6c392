"""Server strategies on hand-made replies: what is sent, what is averaged, what never is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from core.fl_config import GENERATOR_PREFIX, FLConfig, build_model, local_key_filter, shared_keys
from core.norm import is_norm_key
from core.training import proximal_term
from server.strategies import make_strategy


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages built outside a Flower process need a task identity (a Flower class attribute)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class FakeGrid:
    """Just enough of a Grid for configure_*: a fixed set of connected nodes."""

    def __init__(self, n: int) -> None:
        self.ids = list(range(1, n + 1))

    def get_node_ids(self) -> list[int]:
        return self.ids


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _reply(arrays: dict[str, np.ndarray], n: int, pid: int) -> Message:
    content = RecordDict({"arrays": _record(arrays),
                          "metrics": MetricRecord({"num-examples": n, "partition-id": pid, "train-loss": 1.0})})
    return Message(content=content, dst_node_id=pid + 1, message_type=MessageType.TRAIN)


@pytest.fixture(scope="module")
def model_state() -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    cfg = FLConfig(strategy="fedbn", model_width=0.125, image_size=16)
    model = build_model(cfg)
    return model, {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}


def _client_states(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    a = {k: np.full_like(v, 1.0) for k, v in state.items()}
    b = {k: np.full_like(v, 4.0) for k, v in state.items()}
    return a, b


def test_fedavg_averages_everything_by_sample_count(model_state) -> None:
    model, state = model_state
    strat = make_strategy("fedavg", num_clients=2, local_keys=set())
    a, b = _client_states(state)
    arrays, _ = strat.aggregate_train(1, [_reply(a, 100, 0), _reply(b, 300, 1)])
    assert set(arrays.keys()) == set(state)
    for k, v in arrays.items():
        np.testing.assert_allclose(v.numpy(), 0.25 * 1.0 + 0.75 * 4.0, rtol=1e-6)


def test_fedbn_never_sends_or_averages_norm_layers(model_state) -> None:
    model, state = model_state
    cfg = FLConfig(strategy="fedbn")
    local = local_key_filter(model, cfg)
    assert local and all(is_norm_key(model, k) for k in local)
    assert {k for k in state if is_norm_key(model, k)} == local  # selected by type: every norm tensor
    strat = make_strategy("fedbn", num_clients=2, local_keys=local)

    sent = list(strat.configure_train(1, _record(state), ConfigRecord(), FakeGrid(2)))
    assert len(sent) == 2
    for msg in sent:
        keys = set(msg.content["arrays"].keys())
        assert keys == set(shared_keys(model, cfg)) and not keys & local

    # clients that (wrongly) send their norm layers: they are dropped, never averaged
    a, b = _client_states(state)
    arrays, metrics = strat.aggregate_train(1, [_reply(a, 1, 0), _reply(b, 1, 1)])
    assert not set(arrays.keys()) & local
    assert set(arrays.keys()) == set(state) - local
    for v in arrays.values():
        np.testing.assert_allclose(v.numpy(), 2.5, rtol=1e-6)
    assert "partition-id" not in metrics and metrics["train-loss"] == pytest.approx(1.0)


def test_fedprox_sends_mu_and_its_term_is_zero_at_the_global_weights(model_state) -> None:
    model, state = model_state
    strat = make_strategy("fedprox", num_clients=2, local_keys=set(), proximal_mu=0.01)
    msg = next(iter(strat.configure_train(3, _record(state), ConfigRecord(), FakeGrid(2))))
    assert msg.content["config"]["proximal-mu"] == pytest.approx(0.01)
    assert msg.content["config"]["server-round"] == 3

    global_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    term = proximal_term(model, global_params).detach()
    assert float(term) == 0.0
    with torch.no_grad():
        first = next(model.parameters())
        first.add_(0.1)
    moved = proximal_term(model, global_params).detach()
    assert float(moved) == pytest.approx(0.5 * 0.01 * first.numel(), rel=1e-4)
    with torch.no_grad():
        first.sub_(0.1)


def test_local_only_sends_nothing_and_keeps_no_global_model(model_state) -> None:
    model, state = model_state
    strat = make_strategy("local", num_clients=2, local_keys=set(state))
    sent = list(strat.configure_train(1, _record(state), ConfigRecord(), FakeGrid(2)))
    assert all(len(m.content["arrays"]) == 0 for m in sent)
    empty = {}
    arrays, _ = strat.aggregate_train(1, [_reply(empty, 5, 0), _reply(empty, 5, 1)])
    assert arrays is None


def test_fraug_averages_the_generator_by_sample_count_and_sends_it_back(model_state) -> None:
    from core.fraug import make_generator

    model, state = model_state
    local = local_key_filter(model, FLConfig(strategy="fraug"))
    gen = make_generator(0, model.embedding_dim, 10)
    gen_state = {k: v.numpy().astype(np.float32) for k, v in gen.state_dict().items()}
    strat = make_strategy("fraug", num_clients=2, local_keys=local, generator=_record(gen_state))

    sent = list(strat.configure_train(1, _record(state), ConfigRecord(), FakeGrid(2)))
    keys = set(sent[0].content["arrays"].keys())
    assert {GENERATOR_PREFIX + k for k in gen_state} <= keys
    assert not keys & local

    shared = {k: v for k, v in state.items() if k not in local}
    replies = []
    for pid, (n, value) in enumerate(((100, 1.0), (300, 5.0))):
        arrays = {k: np.full_like(v, value) for k, v in shared.items()}
        arrays.update({GENERATOR_PREFIX + k: np.full_like(v, value) for k, v in gen_state.items()})
        replies.append(_reply(arrays, n, pid))
    model_arrays, _ = strat.aggregate_train(1, replies)
    assert not any(k.startswith(GENERATOR_PREFIX) for k in model_arrays.keys())
    expected = 0.25 * 1.0 + 0.75 * 5.0
    for k, v in strat.generator.items():
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6)
    # the averaged generator goes out with the next round's model
    nxt = next(iter(strat.configure_train(2, model_arrays, ConfigRecord(), FakeGrid(2))))
    out = nxt.content["arrays"]
    for k in gen_state:
        np.testing.assert_allclose(out[GENERATOR_PREFIX + k].numpy(), expected, rtol=1e-6)


def test_byte_counts_and_per_client_metrics_reach_the_recorder(model_state, tmp_path) -> None:
    from server.recorder import RunRecorder

    model, state = model_state
    cfg = FLConfig(strategy="fedavg", clients=2, tensorboard=False)
    rec = RunRecorder(tmp_path, cfg)
    strat = make_strategy("fedavg", num_clients=2, local_keys=set(), recorder=rec)
    sent = list(strat.configure_train(1, _record(state), ConfigRecord(), FakeGrid(2)))
    a, b = _client_states(state)
    strat.aggregate_train(1, [_reply(a, 1, 0), _reply(b, 1, 1)])
    ev = [Message(content=RecordDict({"metrics": MetricRecord(
        {"num-examples": 10, "partition-id": pid, "test-accuracy": acc, "test-loss": 1.0, "val-accuracy": acc,
         "val-loss": 1.0})}), dst_node_id=pid + 1, message_type=MessageType.EVALUATE)
        for pid, acc in ((0, 0.5), (1, 0.7))]
    strat.aggregate_evaluate(1, ev)
    entry = rec.history[-1]
    one_model = sum(len(v.data) + len(k) for k, v in _record(state).items())
    assert entry.bytes_up == 2 * one_model and entry.bytes_down == sum(
        m.content["arrays"].count_bytes() for m in sent)
    assert entry.clients["mnist"].test_accuracy == 0.5
    assert entry.clients["inverse"].test_accuracy == 0.7
    assert entry.mean_accuracy == pytest.approx(0.6)
    assert rec.results().per_client_accuracy == {"mnist": 0.5, "inverse": 0.7}
    rec.close()


def test_a_federation_of_the_wrong_size_is_refused_not_waited_on_forever() -> None:
    from server.app import wait_for_nodes

    wait_for_nodes(FakeGrid(2), 2)
    with pytest.raises(ValueError, match="clients=2 but 3"):
        wait_for_nodes(FakeGrid(3), 2)
    with pytest.raises(ValueError, match="num-supernodes=2"):
        wait_for_nodes(FakeGrid(1), 2, timeout=0.2)


def test_deploy_norm_is_averaged_apart_and_never_mixed_into_the_model(model_state) -> None:
    """FedBN clients report their local norm layers for the exported model only."""
    from core.fl_config import DEPLOY_NORM_RECORD

    model, state = model_state
    local = local_key_filter(model, FLConfig(strategy="fedbn"))
    strat = make_strategy("fedbn", num_clients=2, local_keys=local)
    a, b = _client_states(state)
    replies = []
    for arrays, n, pid in ((a, 100, 0), (b, 300, 1)):
        msg = _reply({k: v for k, v in arrays.items() if k not in local}, n, pid)
        msg.content[DEPLOY_NORM_RECORD] = _record({k: v for k, v in arrays.items() if k in local})
        replies.append(msg)
    arrays, _ = strat.aggregate_train(1, replies)
    assert not set(arrays.keys()) & local  # the shared model never contains the local layers
    assert set(strat.deploy_norm.keys()) == local
    for k, v in strat.deploy_norm.items():
        expected = 0.25 * 1.0 + 0.75 * 4.0
        np.testing.assert_allclose(v.numpy(), np.asarray(expected, dtype=state[k].dtype), rtol=1e-6)
    assert all(DEPLOY_NORM_RECORD not in m.content.array_records for m in replies)
    # and each client's own layers are kept apart, by partition id, for per-domain edges
    assert set(strat.client_norm) == {0, 1}
    for pid, value in ((0, 1.0), (1, 4.0)):
        assert set(strat.client_norm[pid]) == local
        assert all(np.allclose(v, value) for v in strat.client_norm[pid].values())


def test_checkpoint_rounds_collect_client_states_and_a_resume_sends_each_its_own(model_state) -> None:
    """send-state on every k-th global round and the run's last; the states are popped before
    averaging and kept by partition; a restore goes once, each node its own."""
    from core.fl_config import CLIENT_STATE_RECORD, SEND_STATE_KEY

    _, state = model_state
    strat = make_strategy("fedavg", num_clients=2, local_keys=set(), checkpoint_every=3, last_round=5,
                          round_offset=1)
    assert [r for r in range(1, 6) if strat.is_checkpoint_round(r)] == [2, 5]  # global rounds 3 and 6
    grid = FakeGrid(2)
    plain = list(strat.configure_train(1, _record(state), ConfigRecord(), grid))
    assert all(m.content["config"][SEND_STATE_KEY] is False for m in plain)
    assert list(strat.configure_train(2, _record(state), ConfigRecord(), grid))[0].content["config"][SEND_STATE_KEY]

    replies = [_reply(state, 10, pid) for pid in (0, 1)]
    for pid, msg in enumerate(replies):
        msg.content[CLIENT_STATE_RECORD] = _record({"local-model/w": np.full(3, pid, np.float32)})
    arrays, _ = strat.aggregate_train(2, replies)  # would fail in FedAvg with two ArrayRecords per reply
    assert set(arrays.keys()) == set(state)
    assert {pid: rec["local-model/w"].numpy().tolist() for pid, rec in strat.client_state.items()} == {
        0: [0.0] * 3, 1: [1.0] * 3}

    restore = {1: _record({"local-model/w": np.zeros(3, np.float32)}),
               2: _record({"local-model/w": np.ones(3, np.float32)})}
    resumed = make_strategy("fedavg", num_clients=2, local_keys=set(), restore=restore)
    first = list(resumed.configure_train(1, _record(state), ConfigRecord(), grid))
    for m in first:
        sent = m.content[CLIENT_STATE_RECORD]["local-model/w"].numpy()
        np.testing.assert_array_equal(sent, restore[m.metadata.dst_node_id]["local-model/w"].numpy())
    second = list(resumed.configure_train(2, _record(state), ConfigRecord(), grid))
    assert all(CLIENT_STATE_RECORD not in m.content.array_records for m in second)  # sent once


def test_simulation_grid_polls_replies_often_deployment_grid_untouched() -> None:
    from flwr.superlink.grid import InMemoryGrid

    from server.app import REPLY_POLL_SECONDS, poll_replies_often

    grid = InMemoryGrid.__new__(InMemoryGrid)  # only its polling interval matters here
    grid.pull_interval = 0.1
    poll_replies_often(grid)
    assert grid.pull_interval == REPLY_POLL_SECONDS

    class OtherGrid:
        pull_interval = 3.0

    other = OtherGrid()
    poll_replies_often(other)  # type: ignore[arg-type]
    assert other.pull_interval == 3.0


def test_each_rounds_evaluation_rides_on_the_next_train_message(model_state, tmp_path) -> None:
    """Inside start(): round r's evaluation comes back with round r+1's training replies; only the
    last round sends evaluate messages; the checkpoint hook gets round r's own global arrays."""
    from core.fl_config import EVALUATE_RECEIVED_KEY, EVALUATED_PREFIX
    from server.recorder import RunRecorder

    _, state = model_state
    cfg = FLConfig(strategy="fedavg", clients=2, tensorboard=False)
    rec = RunRecorder(tmp_path, cfg)
    ends: list[tuple[int, float]] = []
    strat = make_strategy("fedavg", num_clients=2, local_keys=set(), recorder=rec,
                          on_round_end=lambda end: ends.append(
                              (end.round, float(next(iter(end.arrays.values())).numpy().flat[0]))))
    strat.num_rounds = 2  # what start() sets for Flower's loop
    a, b = _client_states(state)

    sent1 = list(strat.configure_train(1, _record(state), ConfigRecord(), FakeGrid(2)))
    assert EVALUATE_RECEIVED_KEY not in sent1[0].content["config"]
    w1, _ = strat.aggregate_train(1, [_reply(a, 1, 0), _reply(b, 1, 1)])  # all 2.5
    assert list(strat.configure_evaluate(1, w1, ConfigRecord(), FakeGrid(2))) == []
    assert strat.aggregate_evaluate(1, []) is None and rec.history == []

    sent2 = list(strat.configure_train(2, w1, ConfigRecord(), FakeGrid(2)))
    assert sent2[0].content["config"][EVALUATE_RECEIVED_KEY] is True
    replies = [_reply(b, 1, 0), _reply(b, 1, 1)]  # round 2 -> all 4.0
    for msg, acc in zip(replies, (0.5, 0.7)):
        msg.content["metrics"].update({EVALUATED_PREFIX + k: v for k, v in {
            "num-examples": 10, "partition-id": msg.content["metrics"]["partition-id"], "test-accuracy": acc,
            "test-loss": 1.0, "val-accuracy": acc, "val-loss": 1.0}.items()})
    w2, train_metrics = strat.aggregate_train(2, replies)
    assert not any(k.startswith(EVALUATED_PREFIX) for k in train_metrics)
    assert [h.round for h in rec.history] == [1] and rec.history[0].mean_accuracy == pytest.approx(0.6)
    assert ends == [(1, 2.5)]

    sent3 = list(strat.configure_evaluate(2, w2, ConfigRecord(), FakeGrid(2)))
    assert len(sent3) == 2  # the last round is evaluated on its own
    ev = [Message(content=RecordDict({"metrics": MetricRecord(
        {"num-examples": 10, "partition-id": pid, "test-accuracy": 0.9, "test-loss": 1.0, "val-accuracy": 0.9,
         "val-loss": 1.0})}), dst_node_id=pid + 1, message_type=MessageType.EVALUATE) for pid in (0, 1)]
    strat.aggregate_evaluate(2, ev)
    assert [h.round for h in rec.history] == [1, 2] and rec.history[1].mean_accuracy == pytest.approx(0.9)
    assert ends == [(1, 2.5), (2, 4.0)]
    rec.close()


def test_nan_or_misshaped_client_updates_are_rejected_and_the_round_goes_on(model_state, caplog) -> None:
    """Issue 12: an update with NaN/Inf, another shape or dtype, missing keys or a bad sample
    count is dropped and logged; the round averages the rest."""
    _, state = model_state
    strat = make_strategy("fedavg", num_clients=5, local_keys=set())
    list(strat.configure_train(1, _record(state), ConfigRecord(), FakeGrid(5)))
    good, other = _client_states(state)  # all ones / all fours
    key = next(k for k, v in state.items() if v.dtype == np.float32 and v.size > 1)
    nan = {**other, key: np.full_like(other[key], np.nan)}
    shaped = {**other, key: other[key].reshape(-1)[:-1]}
    missing = {k: v for k, v in other.items() if k != key}
    replies = [_reply(good, 10, 0), _reply(nan, 10, 1), _reply(shaped, 10, 2), _reply(missing, 10, 3),
               _reply(other, 0, 4)]
    arrays, _ = strat.aggregate_train(1, replies)
    assert strat.rejected == 4
    # FedAvg's average turns an int64 counter into float64, which the next round sends: honest
    # clients still reply int64, and that must pass
    tiny = {"w": np.ones(3, np.float32), "bn.num_batches_tracked": np.asarray(7, np.int64)}
    strat2 = make_strategy("fedavg", num_clients=2, local_keys=set())
    list(strat2.configure_train(1, _record(tiny), ConfigRecord(), FakeGrid(2)))
    avg, _ = strat2.aggregate_train(1, [_reply(tiny, 10, 0), _reply(tiny, 10, 1)])
    sent = list(strat2.configure_train(2, avg, ConfigRecord(), FakeGrid(2)))[0].content["arrays"]
    assert sent["bn.num_batches_tracked"].dtype != "int64"
    strat2.aggregate_train(2, [_reply(tiny, 10, 0), _reply(tiny, 10, 1)])
    assert strat2.rejected == 0
    for k, v in arrays.items():  # only the good client's update was averaged
        np.testing.assert_allclose(v.numpy(), good[k])
    reasons = " | ".join(r.getMessage() for r in caplog.records if "rejected" in r.getMessage())
    for what in ("NaN or Inf", "shape", "keys differ", "sample count"):
        assert what in reasons, reasons


def test_a_rejected_reply_leaves_no_trace_in_the_deployed_norm_or_the_checkpoint(model_state) -> None:
    """Its local norm layers and its client state are dropped with its update; a NaN in the local
    norm layers alone rejects the reply too."""
    from core.fl_config import CLIENT_STATE_RECORD, DEPLOY_NORM_RECORD

    model, state = model_state
    local = local_key_filter(model, FLConfig(strategy="fedbn"))
    strat = make_strategy("fedbn", num_clients=3, local_keys=local)
    shared = {k: v for k, v in state.items() if k not in local}
    list(strat.configure_train(1, _record(shared), ConfigRecord(), FakeGrid(3)))
    good, other = _client_states(state)
    replies = []
    for pid, arrays, norm_value in ((0, good, 1.0), (1, {**other, next(iter(shared)): np.full_like(
            other[next(iter(shared))], np.inf)}, 4.0), (2, good, np.nan)):
        msg = _reply({k: v for k, v in arrays.items() if k not in local}, 10, pid)
        msg.content[DEPLOY_NORM_RECORD] = _record({k: np.full_like(state[k], norm_value) for k in local})
        msg.content[CLIENT_STATE_RECORD] = _record({"meta/rounds-trained": np.asarray([1], np.int64)})
        replies.append(msg)
    strat.aggregate_train(1, replies)
    assert strat.rejected == 2
    assert set(strat.client_norm) == {0} and set(strat.client_state) == {0}
    assert all(np.allclose(v.numpy(), 1.0) for v in strat.deploy_norm.values())


def test_a_step_that_jumped_is_refused_steady_growth_is_not(model_state, caplog) -> None:
    """max-update-jump: a lone finite update far from the model sent (against the recent rounds'
    median step and this round's) is dropped; steps growing 7% a round pass, a move shared by
    most clients passes, the counter does not count (int64 in round 1, float64 once averaged), an
    integer reply of a float layer is still measured, and with the option off it is averaged in."""
    _, state = model_state
    floats = {k: v.astype(np.float32) for k, v in state.items() if v.dtype.kind == "f"}
    key = next(iter(floats))
    n = sum(v.size for v in floats.values())

    def sent(rnd: int) -> dict[str, np.ndarray]:  # FedAvg's average makes the counter float64
        return {**floats, "bn.num_batches_tracked": np.asarray(20 * rnd, np.int64 if rnd == 1 else np.float64)}

    def moved(rnd: int, by: float) -> dict[str, np.ndarray]:  # every float moves by `by`
        return {**{k: v + np.float32(by) for k, v in floats.items()},
                "bn.num_batches_tracked": np.asarray(20 * rnd + 5000, np.int64)}  # a counter jump: ignored

    guarded = make_strategy("fedavg", num_clients=3, local_keys=set(), max_update_jump=10.0)
    plain = make_strategy("fedavg", num_clients=3, local_keys=set())

    def round_(strat, rnd: int, replies: list[Message]):
        list(strat.configure_train(rnd, _record(sent(rnd)), ConfigRecord(), FakeGrid(3)))
        return strat.aggregate_train(rnd, replies)[0]

    for rnd in range(1, 7):  # steady rounds, steps growing 7% a round: all pass
        for strat in (guarded, plain):
            round_(strat, rnd, [_reply(moved(rnd, 0.01 * 1.07 ** rnd * (1 + 0.1 * i)), 10, i) for i in range(3)])
    assert guarded.rejected == 0
    # the median of the last 5 rounds' medians: round 4's middle client
    assert guarded.step_guard.reference() == pytest.approx(0.011 * 1.07 ** 4 * n ** 0.5, rel=1e-3)

    def lone_jump() -> list[Message]:
        return [_reply(moved(7, 0.012), 10, 0), _reply(moved(7, 0.2), 10, 1), _reply(moved(7, 0.013), 10, 2)]

    arrays = round_(guarded, 7, lone_jump())
    assert guarded.rejected == 1
    np.testing.assert_allclose(arrays[key].numpy(), floats[key] + 0.0125, rtol=1e-5, atol=1e-6)
    assert round_(plain, 7, lone_jump())[key].numpy().mean() > (floats[key] + 0.07).mean()  # averaged in
    assert plain.rejected == 0
    assert any("max-update-jump 10" in r.getMessage() and "partition 1" in r.getMessage() for r in caplog.records)
    # a float layer sent back as huge integers is measured as what it is
    as_int = {**moved(8, 0.012), key: np.full(floats[key].shape, 10**6, np.int64)}
    round_(guarded, 8, [_reply(moved(8, 0.012), 10, 0), _reply(as_int, 10, 1), _reply(moved(8, 0.013), 10, 2)])
    assert guarded.rejected == 2
    # the whole federation moving at once (2 of 3 clients jump) is not an outlier: nobody is locked out
    arrays = round_(guarded, 9, [_reply(moved(9, 0.5), 10, 0), _reply(moved(9, 0.5), 10, 1),
                                 _reply(moved(9, 0.012), 10, 2)])
    assert guarded.rejected == 2 and arrays is not None
    # an error reply (a client that crashed) is left to FedAvg, which drops it; the guard skips it
    failed = Message(Error(code=0, reason="client crashed"), reply_to=_reply(moved(10, 0.0), 10, 2))
    list(guarded.configure_train(10, _record(sent(10)), ConfigRecord(), FakeGrid(3)))
    arrays = guarded.aggregate_train(10, [_reply(moved(10, 0.012), 10, 0), _reply(moved(10, 0.013), 10, 1),
                                          failed])[0]
    assert guarded.rejected == 2 and arrays is not None


def test_max_update_jump_is_validated() -> None:
    with pytest.raises(ValueError, match="max_update_jump"):
        FLConfig(max_update_jump=0.5)
    assert FLConfig(max_update_jump=10).max_update_jump == 10
