"""The per-worker model cache (client/cache.py) changes no result: a reused skeleton is exactly a
freshly built model, and clients alternating on one worker get what fresh models would give them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import client.app as client_app
from client import cache
from client.app import handle_evaluate, handle_train
from core.fl_config import FLConfig, build_model, shared_keys

SMALL = dict(model_width=0.125, image_size=16, clients=2, train_per_client=40, batch_size=16, tensorboard=False)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages built outside a Flower process need a task identity (a Flower class attribute)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    cache.clear()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]
    assert [(p.requires_grad, p.grad) for p in a.parameters()] == [(p.requires_grad, None) for p in b.parameters()]


def test_reused_skeleton_is_exactly_a_fresh_build() -> None:
    cfg = FLConfig(strategy="fedbn", **SMALL)
    model = cache.fresh_model(cfg, lambda: build_model(cfg))
    # dirty everything a message could: values, BN statistics, gradients, flags, modes
    model.train()
    out = model(torch.randn(8, 3, 16, 16))
    out.sum().backward()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.add_(3)
    next(model.parameters()).requires_grad_(False)
    model.eval()

    again = cache.fresh_model(cfg, lambda: pytest.fail("rebuilt a cached model"))
    assert again is model
    _assert_same_model(again, build_model(cfg))


def test_cache_is_keyed_and_bounded() -> None:
    cfgs = [FLConfig(strategy="fedavg", **{**SMALL, "model_width": w}) for w in (0.125, 0.25, 0.5)]
    built: list[Any] = []

    def builder(c: FLConfig) -> Any:
        return lambda: built.append(c) or build_model(c)

    m0 = cache.fresh_model(cfgs[0], builder(cfgs[0]))
    m1 = cache.fresh_model(cfgs[1], builder(cfgs[1]))
    assert m0 is not m1 and _state(m0)["features.0.weight"].shape != _state(m1)["features.0.weight"].shape
    assert cache.fresh_model(cfgs[0], builder(cfgs[0])) is m0  # hit, most recent now
    cache.fresh_model(cfgs[2], builder(cfgs[2]))  # evicts cfgs[1], the least recently used
    assert len(built) == 3
    cache.fresh_model(cfgs[1], builder(cfgs[1]))
    assert len(built) == 4 and cache.MAX_MODELS == 2


def _context(pid: int) -> Context:
    return Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 2},
                   state=RecordDict(), run_config={})


def _message(arrays: dict[str, torch.Tensor], rnd: int, kind: str) -> Message:
    config = ConfigRecord({"server-round": rnd, "global-round": rnd})
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=arrays), "config": config})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _transcript(cfg: FLConfig) -> list[dict[str, Any]]:
    """Two clients alternating on this one worker for 2 rounds of train + evaluate (FedAvg of the
    two replies in between); every reply's arrays and metrics, in order."""
    model = build_model(cfg)
    keep = set(shared_keys(model, cfg))
    arrays = {k: v for k, v in model.state_dict().items() if k in keep}
    contexts = [_context(0), _context(1)]
    out: list[dict[str, Any]] = []
    for rnd in (1, 2):
        replies = [handle_train(_message(arrays, rnd, MessageType.TRAIN), ctx, cfg) for ctx in contexts]
        for reply in replies:
            out.append({"arrays": {k: v.numpy() for k, v in reply.content["arrays"].items()},
                        "metrics": dict(reply.content["metrics"])})
        arrays = {k: torch.from_numpy(np.asarray((replies[0].content["arrays"][k].numpy()
                                                  + replies[1].content["arrays"][k].numpy()) / 2)).to(v.dtype)
                  for k, v in arrays.items()}
        for ctx in contexts:
            ev = handle_evaluate(_message(arrays, rnd, MessageType.EVALUATE), ctx, cfg)
            out.append({"metrics": dict(ev.content["metrics"])})
    return out


@pytest.mark.parametrize("strategy", ["fedbn", "fedavg"])
def test_alternating_clients_on_one_worker_match_fresh_models(strategy: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """FedBN keeps each client's BN layers local: a skeleton still holding the other client's
    values would change the results. They must be bit-identical to a new model per message."""
    cfg = FLConfig(strategy=strategy, **SMALL)
    cached = _transcript(cfg)
    with monkeypatch.context() as m:
        m.setattr(client_app, "fresh_model", lambda key, build: build())
        fresh = _transcript(cfg)
    assert len(cached) == len(fresh)
    for a, b in zip(cached, fresh):
        assert a["metrics"] == b["metrics"]
        for k in b.get("arrays", {}):
            np.testing.assert_array_equal(a["arrays"][k], b["arrays"][k], err_msg=k)
    # and the cache was really used: one skeleton for the whole transcript
    assert len(cache._entries()) == 1
