"""CEMA's cloud step: losses pinned on hand-made logits, EATA weights, replay, the learner."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.cema import (
    CemaConfig,
    CemaLearner,
    ReplayBuffer,
    distillation_loss,
    eata_weights,
    softmax_entropy,
    teacher_loss,
)
from core.models import create_model
from core.norm import norm_affine_parameters, norm_modules

LN2, LN3 = math.log(2), math.log(3)
H_QUARTER = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # entropy of (3/4, 1/4)


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------- losses


def test_softmax_entropy_by_hand() -> None:
    h = softmax_entropy(_t([[0.0, 0.0], [LN3, 0.0]]))
    assert h.tolist() == pytest.approx([LN2, H_QUARTER], abs=1e-12)
    assert float(softmax_entropy(_t([[5.0, 5.0, 5.0, 5.0]]))) == pytest.approx(math.log(4), abs=1e-12)


def test_eata_weights_and_no_gradient() -> None:
    h = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    w = eata_weights(h, e0=0.5)
    assert w.tolist() == pytest.approx([math.exp(0.5), 1.0, math.exp(-0.5)], abs=1e-6)
    assert not w.requires_grad  # sg[H]: the weights carry no gradient


def test_teacher_loss_by_hand() -> None:
    e0 = 0.4 * LN2
    loss = teacher_loss(_t([[0.0, 0.0], [LN3, 0.0]]), e0)
    expected = (math.exp(e0 - LN2) * LN2 + math.exp(e0 - H_QUARTER) * H_QUARTER) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-12)


def test_distillation_loss_by_hand() -> None:
    e0 = 0.4 * LN2
    student = _t([[0.0, 0.0], [LN3, 0.0]])  # p_s = (1/2, 1/2), (3/4, 1/4)
    teacher = _t([[LN3, 0.0], [0.0, LN3]])  # p_t = (3/4, 1/4), (1/4, 3/4)
    w_s = [math.exp(e0 - LN2), math.exp(e0 - H_QUARTER)]
    w_t = [math.exp(e0 - H_QUARTER)] * 2
    kl = [0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),
          0.25 * math.log(0.25 / 0.75) + 0.75 * math.log(0.75 / 0.25)]
    ce = [LN2, math.log(4)]  # argmax t = 0, then 1: −log 1/2, −log 1/4
    ent = (w_s[0] * LN2 + w_s[1] * H_QUARTER) / 2
    kl_term = (w_t[0] * kl[0] + w_t[1] * kl[1]) / 2
    ce_term = (w_t[0] * ce[0] + w_t[1] * ce[1]) / 2
    out = distillation_loss(student, teacher, e0=e0)
    assert float(out.entropy) == pytest.approx(ent, abs=1e-12)
    assert float(out.kl) == pytest.approx(kl_term, abs=1e-12)
    assert float(out.ce) == pytest.approx(ce_term, abs=1e-12)
    assert float(out.total) == pytest.approx(3 * ent + 3 * kl_term + ce_term, abs=1e-12)
    custom = distillation_loss(student, teacher, e0=e0, alpha=0.5, beta=2.0, gamma=0.0)
    assert float(custom.total) == pytest.approx(0.5 * ent + 2 * kl_term, abs=1e-12)


def test_distillation_temperature_by_hand() -> None:
    """T = 2: the KL is taken between softmax(·/2) and scaled by T² = 4; weights and CE use T = 1."""
    e0 = 0.4 * LN2
    student, teacher = _t([[0.0, 0.0]]), _t([[2 * LN3, 0.0]])  # teacher/2 → (3/4, 1/4); T=1: (9/10, 1/10)
    h_t = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    w_t = math.exp(e0 - h_t)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    out = distillation_loss(student, teacher, e0=e0, temperature=2.0)
    assert float(out.kl) == pytest.approx(w_t * 4 * kl, abs=1e-12)
    assert float(out.ce) == pytest.approx(w_t * LN2, abs=1e-12)
    assert float(out.entropy) == pytest.approx(math.exp(e0 - LN2) * LN2, abs=1e-12)


def test_distillation_gradient_flows_to_student_only() -> None:
    student = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    distillation_loss(student, teacher, e0=0.4).total.backward()
    assert student.grad is not None and teacher.grad is None


# ------------------------------------------------------------------------------------- replay


def test_replay_fifo_keeps_newest() -> None:
    buf = ReplayBuffer(5, seed=0)
    buf.add(torch.arange(3, dtype=torch.float32).view(3, 1))
    assert len(buf) == 3
    buf.add(torch.arange(3, 8, dtype=torch.float32).view(5, 1))
    assert len(buf) == 5
    assert buf.contents().view(-1).tolist() == [3, 4, 5, 6, 7]
    buf.add(torch.arange(8, 20, dtype=torch.float32).view(12, 1))  # more than capacity at once
    assert buf.contents().view(-1).tolist() == [15, 16, 17, 18, 19]


def test_replay_sampling_uniform_and_seeded() -> None:
    buf = ReplayBuffer(10, seed=3)
    buf.add(torch.arange(10, dtype=torch.float32).view(10, 1))
    draw = buf.sample(6).view(-1).tolist()
    assert len(set(draw)) == 6 and set(draw) <= set(range(10))  # without replacement
    again = ReplayBuffer(10, seed=3)
    again.add(torch.arange(10, dtype=torch.float32).view(10, 1))
    assert again.sample(6).view(-1).tolist() == draw
    counts = np.bincount(np.concatenate([buf.sample(5).view(-1).int().numpy() for _ in range(2000)]), minlength=10)
    assert counts.min() > 800 and counts.max() < 1200  # 1000 expected per item
    buf.clear()
    assert len(buf) == 0
    with pytest.raises(ValueError):
        buf.sample(1)


# ------------------------------------------------------------------------------------- learner


def _models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    student = create_model("edge_cnn", 10, image_size=16, width=8)
    teacher = create_model("teacher_resnet", 10, image_size=16, width=8, blocks=1)
    return student, teacher


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_learner_batching_and_replay_mix() -> None:
    student, teacher = _models()
    cfg = CemaConfig(batch_size=4, replay_start=8, replay_capacity=100)
    learner = CemaLearner(student, teacher, cfg, num_classes=10)
    assert learner.step() is None  # nothing queued
    learner.add(_images(3))
    assert learner.step() is None  # no batch, replay too small
    learner.add(_images(5, 1))  # queue 8 → two batches, uploads alone (replay 0, then 4 < 8)
    sizes = [learner.step()["batch_size"] for _ in range(2)]
    assert sizes == [4, 4] and len(learner.replay) == 8 and learner.step() is None
    learner.add(_images(4, 2))  # replay 8 ≥ start: B uploads + 3B replay
    stats = learner.step()
    assert stats["batch_size"] == 16 and stats["uploads_in_batch"] == 4 and "teacher_loss" in stats
    assert len(learner.replay) == 12 and learner.step() is None
    learner.add(_images(2, 3))  # no batch formed, replay large enough: one 4B replay-only step
    stats = learner.step()
    assert stats["batch_size"] == 16 and stats["uploads_in_batch"] == 0 and "teacher_loss" not in stats
    assert learner.step() is None and learner.queue_size == 2
    assert (learner.student_steps, learner.teacher_steps) == (4, 3)


def test_learner_without_replay() -> None:
    student, teacher = _models()
    learner = CemaLearner(student, teacher, CemaConfig(batch_size=4, replay=False, replay_start=4), num_classes=10)
    for i in range(3):
        learner.add(_images(4, i))
        assert learner.step()["batch_size"] == 4
    learner.add(_images(2, 9))
    assert learner.step() is None and len(learner.replay) == 0


def test_tent_uses_no_teacher() -> None:
    student, _ = _models()
    learner = CemaLearner(student, None, CemaConfig(method="tent", batch_size=4), num_classes=10)
    learner.add(_images(4))
    stats = learner.step()
    assert learner.teacher is None and "kl" not in stats and stats["student_loss"] == stats["entropy"]
    with pytest.raises(ValueError, match="needs a teacher"):
        CemaLearner(student, None, CemaConfig(method="cema"), num_classes=10)


def test_only_norm_affine_params_change_and_reset_restores() -> None:
    student, teacher = _models()
    learner = CemaLearner(student, teacher, CemaConfig(batch_size=8, replay_start=8), num_classes=10)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    learner.add(_images(8), labels=np.arange(8) % 10)
    stats = learner.step()
    assert "student_acc_uploads" in stats and "teacher_acc_uploads" in stats
    for model, before in ((student, s0), (teacher, t0)):
        norm_keys = {f"{name}.{t}" for name, _ in norm_modules(model) for t in ("weight", "bias")}
        stat_keys = {f"{name}.{t}" for name, _ in norm_modules(model) for t in ("running_mean", "running_var")}
        after = model.state_dict()
        for key, value in after.items():
            changed = not torch.equal(value, before[key])
            if key in norm_keys or key in stat_keys:
                assert changed, key  # adapted affine params; running stats (BN in train mode)
            elif not key.endswith("num_batches_tracked"):
                assert not changed, key  # convolutions and the classifier stay frozen
        assert all(p.requires_grad for p in norm_affine_parameters(model))
    published = learner.norm_state()
    assert set(published) == {f"{n}.{t}" for n, _ in norm_modules(student)
                              for t in ("weight", "bias", "running_mean", "running_var")}
    learner.add(_images(3, 5))
    learner.reset()
    assert learner.queue_size == 0 and len(learner.replay) == 0 and learner.student_steps == 0
    for model, before in ((student, s0), (teacher, t0)):
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    # a fresh episode behaves like a fresh learner: same first step, same result
    fresh_s, fresh_t = _models()
    fresh = CemaLearner(fresh_s, fresh_t, CemaConfig(batch_size=8, replay_start=8), num_classes=10)
    for lrn in (learner, fresh):
        lrn.add(_images(8))
        lrn.step()
    for a, b in zip(learner.norm_state().values(), fresh.norm_state().values()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="method"):
        CemaConfig(method="eata")
    with pytest.raises(ValueError, match="batch_size"):
        CemaConfig(batch_size=0)
    assert CemaConfig().e0(10) == pytest.approx(0.4 * math.log(10))
    assert CemaConfig().student_lr == pytest.approx(10 * CemaConfig().teacher_lr)


def test_authors_preset_sets_their_constants_and_explicit_values_win() -> None:
    cfg = CemaConfig(preset="authors")
    assert (cfg.batch_size, cfg.teacher_lr, cfg.student_lr, cfg.replay_capacity, cfg.replay_start,
            cfg.replay_at_upload) == (32, 2.5e-4, 2.5e-3, 10_000, 256, True)
    assert CemaConfig(preset="authors", batch_size=8).batch_size == 8
    assert CemaConfig(preset="authors", replay_start=256) == cfg  # idempotent: a written config reloads equal


def test_replay_at_upload_fills_the_replay_before_any_step() -> None:
    student, teacher = _models()
    learner = CemaLearner(student, teacher, CemaConfig(batch_size=8, replay_at_upload=True), num_classes=10)
    learner.add(_images(5))
    assert len(learner.replay) == 5 and learner.step() is None  # no batch yet, the replay too small
    learner.add(_images(5, seed=1))
    assert learner.step() is not None and len(learner.replay) == 10  # not added twice


@pytest.mark.parametrize("edge_norm", ["batch", "running"])
def test_channels_last_is_the_same_learner(edge_norm: str) -> None:
    """The memory format is a speed knob only: six steps (teacher + student, replay mixed in) give
    the same published state and teacher parameters either way."""
    states, teachers = [], []
    for channels_last in (False, True):
        torch.manual_seed(0)
        student, teacher = _models()
        cfg = CemaConfig(batch_size=8, replay_start=8, edge_norm=edge_norm, channels_last=channels_last)
        learner = CemaLearner(student, teacher, cfg, num_classes=10)
        for i in range(6):
            learner.add(_images(8, seed=i))
            assert learner.step() is not None
        states.append(learner.norm_state())
        teachers.append([p.detach().clone() for p in norm_affine_parameters(learner.teacher)])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        np.testing.assert_allclose(states[1][key], states[0][key], rtol=1e-4, atol=1e-5, err_msg=key)
    for a, b in zip(*teachers):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    conv = next(m for m in learner.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # the knob did act


@pytest.mark.parametrize("edge_norm", ["batch", "running"])
def test_learner_state_round_trip_continues_exactly(tmp_path, edge_norm: str) -> None:
    """A learner saved mid-stream (queue, replay ring wrapped, momentum, pending running init) and
    loaded into a fresh one from the same templates steps exactly as the original."""
    cfg = CemaConfig(batch_size=4, replay_start=8, replay_capacity=10, edge_norm=edge_norm)

    def fresh() -> CemaLearner:
        return CemaLearner(*_models(), cfg, num_classes=10)

    learner = fresh()
    learner.add(_images(14), np.arange(14) % 10)
    for _ in range(3):
        learner.step()
    assert learner.queue_size == 2 and len(learner.replay) == 10  # the ring wrapped
    path = tmp_path / "learner.pt"
    torch.save(learner.state_dict(), path)
    copy_ = fresh()
    copy_.load_state_dict(torch.load(path, weights_only=True))
    if edge_norm == "running":  # the episode's first batch set the statistics: not pending any more
        assert not any(m.pending_init for m in copy_.student.modules() if hasattr(m, "pending_init"))
    for one in (learner, copy_):
        one.add(_images(9, 5))
    for _ in range(4):
        a, b = learner.step(), copy_.step()
        assert a == b
    for name, value in learner.norm_state().items():
        np.testing.assert_array_equal(value, copy_.norm_state()[name])
    assert learner.replay.contents().equal(copy_.replay.contents())
    assert (learner.student_steps, learner.teacher_steps) == (copy_.student_steps, copy_.teacher_steps)


def test_learner_state_refuses_another_setup() -> None:
    state = CemaLearner(*_models(), CemaConfig(batch_size=4, edge_norm="running"), num_classes=10).state_dict()
    with pytest.raises(ValueError, match="edge normalization"):
        CemaLearner(*_models(), CemaConfig(batch_size=4), num_classes=10).load_state_dict(state)
    with pytest.raises(ValueError, match="teacher"):
        CemaLearner(_models()[0], None, CemaConfig(method="tent", batch_size=4), num_classes=10).load_state_dict(state)
