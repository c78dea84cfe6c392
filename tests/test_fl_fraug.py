"""FRAug's pieces (core/fraug.py) and the shared local loop (core/training.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.data import make_digits_shift
from core.export import Preprocess
from core.fl_config import FLConfig, build_model
from core.fraug import (
    FRAugHook,
    FRAugSettings,
    RTNet,
    cyclic_labels,
    entropy,
    lambda_schedule,
    make_generator,
    mmd_gaussian,
    update_prototypes,
)
from core.training import LocalSpec, evaluate, minibatches, to_tensor, train_local


def test_lambda_schedule_caps_ramps_and_warms_up() -> None:
    assert lambda_schedule(10, 300, 0.002) == 0.5  # Digits: exp(-0.58) > 0.5
    assert lambda_schedule(1, 100, 0.01) == pytest.approx(math.exp(-0.99))
    assert lambda_schedule(5, 100, 0.01, warmup_rounds=5) == 0.0
    assert lambda_schedule(6, 100, 0.01, warmup_rounds=5) > 0.0
    assert lambda_schedule(100, 100, 0.01, lambda_max=0.25) == 0.25


def test_mmd_is_zero_for_the_same_sample_and_grows_with_a_shift() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    assert float(mmd_gaussian(x, x)) == pytest.approx(0.0, abs=1e-6)
    near = float(mmd_gaussian(x, torch.randn(32, 8, generator=g)))
    far = float(mmd_gaussian(x, torch.randn(32, 8, generator=g) + 3.0))
    assert 0.0 <= near < far
    # bounded however far one sample moves (the bandwidths follow the data): a generator that
    # maximises it cannot run away as it does with the MSE form (README, the FRAug study)
    farther = [float(mmd_gaussian(x * scale, x)) for scale in (1e2, 1e4, 1e8)]
    assert all(0.0 < v <= 10.0 for v in farther)
    assert farther[2] == pytest.approx(farther[1], abs=0.05)  # saturated: blowing up gains nothing


def test_prototypes_update_only_present_classes_with_momentum() -> None:
    protos = torch.zeros(3, 2)
    u = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    y = torch.tensor([0, 0])
    out = update_prototypes(protos, u, y, 0.3)
    np.testing.assert_allclose(out[0].numpy(), [0.6, 0.6], rtol=1e-6)  # 0.7·0 + 0.3·mean(1, 3)
    assert torch.all(out[1:] == 0)


def test_cyclic_labels_are_class_balanced() -> None:
    y = cyclic_labels(20, 10, 7)
    assert y[0] == 7 and np.bincount(y.numpy(), minlength=10).tolist() == [2] * 10


def test_rtnet_final_bn_is_a_setting() -> None:
    with_bn, without = RTNet(16, 10, final_bn=True), RTNet(16, 10, final_bn=False)
    n_bn = lambda m: sum(isinstance(x, torch.nn.BatchNorm1d) for x in m.modules())  # noqa: E731
    assert n_bn(with_bn) == 2 and n_bn(without) == 1
    v, anchor, y = torch.randn(4, 16), torch.randn(4, 16), torch.tensor([0, 1, 2, 3])
    assert with_bn(v, anchor, y).shape == (4, 16)


def test_entropy_of_uniform_logits_is_log_c() -> None:
    assert float(entropy(torch.zeros(5, 10))) == pytest.approx(math.log(10), rel=1e-6)


def test_preprocessing_matches_the_export_convention() -> None:
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[0, 0, 0] = 255
    x = to_tensor(img)
    p = Preprocess()
    assert x.shape == (1, 3, 2, 2)
    assert float(x[0, 0, 0, 0]) == pytest.approx((1.0 - p.mean[0]) / p.std[0])
    assert float(x[0, 0, 1, 1]) == pytest.approx((0.0 - p.mean[0]) / p.std[0])


def test_minibatches_steps_and_epochs() -> None:
    rng = np.random.default_rng(0)
    assert len(list(minibatches(50, 16, rng, steps=7))) == 7
    batches = list(minibatches(33, 16, rng, epochs=2))  # 16 + 16 + (1 dropped), twice
    assert [len(b) for b in batches] == [16, 16, 16, 16]


@pytest.fixture(scope="module")
def tiny() -> tuple[FLConfig, object]:
    cfg = FLConfig(strategy="fraug", model_width=0.125, image_size=16, clients=1, train_per_client=60,
                   batch_size=20)
    data = make_digits_shift(0, image_size=16, domains=("mnist",), train_per_client=60)
    return cfg, data.clients[0]


@pytest.mark.parametrize("interpolate,noise", [(False, "uniform"), (True, "normal")])
def test_fraug_hook_trains_all_three_parts_and_measures_label_consistency(tiny, interpolate, noise) -> None:
    cfg, client = tiny
    model = build_model(cfg)
    d = model.embedding_dim
    gen = make_generator(0, d, 10)
    settings = FRAugSettings(interpolate=interpolate, noise=noise, g_distance="mmd" if interpolate else "mse")
    hook = FRAugHook(settings, gen, RTNet(d, 10), torch.zeros(10, d), server_round=3, total_rounds=10, seed=1)
    g0 = {k: v.clone() for k, v in gen.state_dict().items()}
    t0 = {k: v.clone() for k, v in hook.T.state_dict().items()}
    res = train_local(model, client.train, LocalSpec(steps=4, batch_size=20), rng=np.random.default_rng(0),
                      hook=hook)
    assert res.steps == 4
    m = res.metrics
    assert m["lambda"] == 0.5
    for key in ("label_consistency_real", "label_consistency_proto"):
        assert 0.0 <= m[key] <= 1.0
    assert all(math.isfinite(v) for v in m.values())
    assert any(not torch.equal(g0[k], v) for k, v in gen.state_dict().items()), "generator trained"
    assert any(not torch.equal(t0[k], v) for k, v in hook.T.state_dict().items()), "RTNet trained"
    assert hook.protos.abs().sum() > 0
    states = hook.optimizer_states()
    assert states["generator"] and states["rtnet"]
    loss, acc = evaluate(model, client.test)
    assert math.isfinite(loss) and 0.0 <= acc <= 1.0


def test_fraug_warmup_trains_like_fedbn(tiny) -> None:
    cfg, client = tiny
    model = build_model(cfg)
    d = model.embedding_dim
    gen = make_generator(0, d, 10)
    g0 = {k: v.clone() for k, v in gen.state_dict().items()}
    hook = FRAugHook(FRAugSettings(warmup_rounds=5), gen, RTNet(d, 10), torch.zeros(10, d), server_round=2,
                     total_rounds=10, seed=1)
    res = train_local(model, client.train, LocalSpec(steps=2, batch_size=20), rng=np.random.default_rng(0),
                      hook=hook)
    assert res.metrics["lambda"] == 0.0
    assert all(torch.equal(g0[k], v) for k, v in gen.state_dict().items())
