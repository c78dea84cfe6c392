"""The ClientApp's handlers called directly with a Context: state persists in Context.state only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import (
    STATE_LOCAL,
    STATE_META,
    STATE_OPT,
    STATE_PROTOS,
    STATE_RTNET,
    handle_evaluate,
    handle_train,
)
from core.fl_config import GENERATOR_PREFIX, FLConfig, build_model, local_key_filter, shared_keys
from core.fraug import make_generator

SMALL = dict(model_width=0.125, image_size=16, clients=2, train_per_client=40, batch_size=16, tensorboard=False)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages built outside a Flower process need a task identity (a Flower class attribute)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _context(pid: int) -> Context:
    return Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 2},
                   state=RecordDict(), run_config={})


def _message(cfg: FLConfig, arrays: dict[str, torch.Tensor], rnd: int, kind: str = MessageType.TRAIN) -> Message:
    config = ConfigRecord({"server-round": rnd, "global-round": rnd})
    if cfg.strategy == "fedprox":
        config["proximal-mu"] = cfg.proximal_mu
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=arrays), "config": config})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _global_arrays(cfg: FLConfig) -> dict[str, torch.Tensor]:
    model = build_model(cfg)
    keep = set(shared_keys(model, cfg))
    arrays = {k: v for k, v in model.state_dict().items() if k in keep}
    if cfg.strategy == "fraug":
        gen = make_generator(cfg.seed, model.embedding_dim, 10)
        arrays.update({GENERATOR_PREFIX + k: v for k, v in gen.state_dict().items()})
    return arrays


@pytest.mark.parametrize("strategy", ["fedbn", "fraug", "local", "fedprox"])
def test_state_persists_across_rounds_in_context(strategy: str) -> None:
    cfg = FLConfig(strategy=strategy, **SMALL)
    ctx = _context(0)
    arrays = _global_arrays(cfg)
    reply1 = handle_train(_message(cfg, arrays, 1), ctx, cfg)
    model = build_model(cfg)
    local = local_key_filter(model, cfg)
    sent = set(reply1.content["arrays"].keys())
    assert not sent & local, "local layers must not leave the client"
    assert reply1.content["metrics"]["partition-id"] == 0
    stored1 = {k: v.numpy().copy() for k, v in ctx.state[STATE_LOCAL].items()}
    assert set(stored1) == local
    assert len(ctx.state[STATE_OPT]) > 0, "SGD momentum is kept"
    assert ctx.state[STATE_META]["rounds-trained"] == 1

    # round 2 starts from the stored local layers: evaluate them before training again
    ev = handle_evaluate(_message(cfg, arrays, 1, MessageType.EVALUATE), ctx, cfg)
    m = ev.content["metrics"]
    assert 0.0 <= m["test-accuracy"] <= 1.0 and 0.0 <= m["val-accuracy"] <= 1.0

    momentum1 = {k: v.numpy().copy() for k, v in ctx.state[STATE_OPT].items()}
    handle_train(_message(cfg, arrays, 2), ctx, cfg)
    assert ctx.state[STATE_META]["rounds-trained"] == 2
    stored2 = {k: v.numpy() for k, v in ctx.state[STATE_LOCAL].items()}
    if local:
        changed = [k for k in local if k.endswith("running_mean") and not np.allclose(stored1[k], stored2[k])]
        assert changed, "round 2 kept training the stored local layers"
    assert any(not np.allclose(momentum1[k], v.numpy()) for k, v in ctx.state[STATE_OPT].items())
    if strategy == "fraug":
        assert len(ctx.state[STATE_RTNET]) > 0
        protos = ctx.state[STATE_PROTOS]["mu"].numpy()
        assert np.abs(protos).sum() > 0
        assert any(k.startswith(GENERATOR_PREFIX) for k in sent)
        metrics = reply1.content["metrics"]
        for key in ("fraug-label_consistency_real", "fraug-label_consistency_proto", "fraug-g_ce", "fraug-t_dist"):
            assert key in metrics
        assert 0.0 <= metrics["fraug-label_consistency_real"] <= 1.0


@pytest.mark.parametrize("strategy", ["fedbn", "fraug"])
def test_a_non_finite_round_leaves_the_clients_state_as_it_was(strategy: str, caplog) -> None:
    """A round whose training goes NaN (here: a NaN in the received weights) is refused by the
    server; the client must not keep its NaN norm layers, momentum or RTNet, or it would be
    refused in every later round. It keeps the state it started the round with, says so, and
    trains normally again from the next finite model."""
    cfg = FLConfig(strategy=strategy, **SMALL)
    ctx = _context(0)
    arrays = _global_arrays(cfg)
    handle_train(_message(cfg, arrays, 1), ctx, cfg)
    before = {name: {k: v.numpy().copy() for k, v in record.items()}
              for name, record in ctx.state.array_records.items()}
    poisoned = {k: v.clone() for k, v in arrays.items()}
    first_conv = next(k for k, v in poisoned.items() if v.dim() == 4)
    poisoned[first_conv][0, 0, 0, 0] = float("nan")
    with caplog.at_level("WARNING", logger="client.app"):
        reply = handle_train(_message(cfg, poisoned, 2), ctx, cfg)
    assert not np.isfinite(reply.content["arrays"][first_conv].numpy()).all()  # the server sees it and refuses it
    assert "local training went non-finite" in caplog.text and STATE_LOCAL in caplog.text
    assert set(ctx.state.array_records) == set(before)
    for name, record in ctx.state.array_records.items():
        for key, value in record.items():
            np.testing.assert_array_equal(value.numpy(), before[name][key])
    assert dict(ctx.state[STATE_META]) == {"rounds-trained": 1, "last-round": 1}

    handle_train(_message(cfg, arrays, 3), ctx, cfg)
    assert ctx.state[STATE_META]["rounds-trained"] == 2
    for record in ctx.state.array_records.values():
        assert all(np.isfinite(v.numpy()).all() for v in record.values())
    changed = [k for k, v in ctx.state[STATE_LOCAL].items() if not np.array_equal(v.numpy(), before[STATE_LOCAL][k])]
    assert changed, "round 3 trained the kept local layers again"


def test_local_state_is_per_context_not_per_process() -> None:
    """Two clients served by the same process (a reused simulation actor) do not share state."""
    cfg = FLConfig(strategy="fedbn", **SMALL)
    arrays = _global_arrays(cfg)
    ctx0, ctx1 = _context(0), _context(1)
    handle_train(_message(cfg, arrays, 1), ctx0, cfg)
    handle_train(_message(cfg, arrays, 1), ctx1, cfg)
    key = next(k for k in ctx0.state[STATE_LOCAL].keys() if k.endswith("running_mean"))
    a, b = ctx0.state[STATE_LOCAL][key].numpy(), ctx1.state[STATE_LOCAL][key].numpy()
    assert not np.allclose(a, b), "different domains give different BN statistics"
    fresh = _context(0)
    handle_train(_message(cfg, arrays, 1), fresh, cfg)
    np.testing.assert_allclose(fresh.state[STATE_LOCAL][key].numpy(), a, rtol=1e-5, atol=1e-6)


def test_client_refuses_local_layers_from_the_server() -> None:
    cfg = FLConfig(strategy="fedbn", **SMALL)
    full = dict(build_model(cfg).state_dict())
    with pytest.raises(ValueError, match="keeps local"):
        handle_train(_message(cfg, full, 1), _context(0), cfg)


def test_fraug_auxiliary_optimizers_never_inherit_the_models_settings() -> None:
    """Issue 11: G's and the RTNet's SGD take fraug-lr-aux / fraug-momentum-aux, whatever the
    model's lr and momentum (the default scenario's 0.05 / 0.9 once leaked into them)."""
    from client.app import _fraug_hook

    cfg = FLConfig(strategy="fraug", lr=0.05, momentum=0.9, fraug_lr_aux=0.025, fraug_momentum_aux=0.5, **SMALL)
    model = build_model(cfg)
    gen = make_generator(cfg.seed, model.embedding_dim, 10)
    hook = _fraug_hook(cfg, _context(0), model, gen.state_dict(), rnd=1, pid=0)
    for opt in (hook.opt_g, hook.opt_t):
        assert [(g["lr"], g["momentum"]) for g in opt.param_groups] == [(0.025, 0.5)] * len(opt.param_groups)
    other = _fraug_hook(FLConfig(strategy="fraug", lr=0.001, momentum=0.0, fraug_lr_aux=0.025,
                                 fraug_momentum_aux=0.5, **SMALL), _context(0), model, gen.state_dict(), 1, 0)
    assert [g["momentum"] for g in other.opt_g.param_groups] == [0.5] * len(other.opt_g.param_groups)
    with pytest.raises(ValueError, match="fraug_momentum_aux"):
        FLConfig(strategy="fraug", fraug_momentum_aux=1.0, **SMALL)


def test_client_state_packs_and_restores_exactly() -> None:
    """pack_state → restore_state gives back every record of Context.state, and a restored
    client trains its next round exactly as the one that never left."""
    from client.app import CLIENT_STATE_RECORD, pack_state, restore_state

    cfg = FLConfig(strategy="fraug", **SMALL)
    arrays = _global_arrays(cfg)
    ctx = _context(0)
    handle_train(_message(cfg, arrays, 1), ctx, cfg)
    packed = pack_state(ctx.state)
    fresh = _context(0)
    restore_state(fresh, packed)
    assert set(fresh.state.array_records) == set(ctx.state.array_records)
    assert dict(fresh.state[STATE_META]) == dict(ctx.state[STATE_META])
    for name, record in ctx.state.array_records.items():
        for key, value in record.items():
            np.testing.assert_array_equal(fresh.state[name][key].numpy(), value.numpy())
    with pytest.raises(ValueError, match="already holds one"):
        restore_state(ctx, packed)
    a = handle_train(_message(cfg, arrays, 2), ctx, cfg)
    msg = _message(cfg, arrays, 2)
    msg.content[CLIENT_STATE_RECORD] = packed  # as the server sends it after a resume
    b = handle_train(msg, _context(0), cfg)
    for key, value in a.content["arrays"].items():
        np.testing.assert_array_equal(b.content["arrays"][key].numpy(), value.numpy())
    assert CLIENT_STATE_RECORD not in a.content  # only checkpoint rounds carry it


@pytest.mark.parametrize("strategy", ["fedbn", "fraug"])
def test_evaluation_folded_into_training_equals_an_evaluate_message(strategy: str) -> None:
    """A train message asking to evaluate the received model first: the same metrics an evaluate
    message with those arrays gives, and exactly the training a plain train message gives."""
    from client.app import handle_train_evaluating_received
    from core.fl_config import EVALUATE_RECEIVED_KEY, EVALUATED_PREFIX

    cfg = FLConfig(strategy=strategy, **SMALL)
    arrays = _global_arrays(cfg)
    ctx_a, ctx_b = _context(1), _context(1)
    for ctx in (ctx_a, ctx_b):  # one round of training first: local layers and momentum in the state
        handle_train(_message(cfg, arrays, 1), ctx, cfg)
    expected = handle_evaluate(_message(cfg, arrays, 2, MessageType.EVALUATE), ctx_a, cfg).content["metrics"]
    plain = handle_train(_message(cfg, arrays, 2), ctx_a, cfg)

    msg = _message(cfg, arrays, 2)
    msg.content["config"][EVALUATE_RECEIVED_KEY] = True
    folded = handle_train_evaluating_received(msg, ctx_b, cfg)
    metrics = folded.content["metrics"]
    assert {k[len(EVALUATED_PREFIX):]: v for k, v in metrics.items() if k.startswith(EVALUATED_PREFIX)} \
        == dict(expected)
    assert {k: v for k, v in metrics.items() if not k.startswith(EVALUATED_PREFIX)} == dict(plain.content["metrics"])
    for k, v in plain.content["arrays"].items():
        np.testing.assert_array_equal(folded.content["arrays"][k].numpy(), v.numpy(), err_msg=k)
    for name, record in ctx_a.state.array_records.items():
        for k, v in record.items():
            np.testing.assert_array_equal(ctx_b.state[name][k].numpy(), v.numpy(), err_msg=f"{name}/{k}")
    # without the key, it is a plain train message
    again = handle_train_evaluating_received(_message(cfg, arrays, 3), ctx_b, cfg)
    assert not any(k.startswith(EVALUATED_PREFIX) for k in again.content["metrics"])
