"""Edge normalization modes: the cloud's student normalizes as its edges do, and what it sends
runs identically on a torch-free edge (core.renorm, METHODS.md "What the authors' code does")."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.cema import CemaConfig, CemaLearner
from core.export import export_onnx
from core.models import create_model
from core.norm import get_norm_state
from core.renorm import RenormBatchNorm, convert_renorm, learning_mode, prepare_student
from edge.runtime import EdgeRuntime
from protos.contract import Preprocess

TOL = 1e-4


def _bn(seed: int = 0) -> nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def test_renorm_outputs_use_running_stats_then_update_them_by_momentum() -> None:
    bn = _bn()
    rn = convert_renorm(nn.Sequential(copy.deepcopy(bn)))[0]
    assert isinstance(rn, RenormBatchNorm) and set(rn.state_dict()) == set(bn.state_dict())
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    rn.train()
    out = rn(x)
    expected = F.batch_norm(x, rm, rv, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(rn.running_mean, 0.9 * rm + 0.1 * mean)
    torch.testing.assert_close(rn.running_var, 0.9 * rv + 0.1 * var)


def test_renorm_gradient_flows_through_batch_statistics() -> None:
    """Same outputs as eval-mode BN, but the gradient w.r.t. the input is that of batch BN scaled
    by r: the per-channel sum of input gradients vanishes (the batch mean is subtracted)."""
    rn = convert_renorm(nn.Sequential(_bn()))[0].train()
    x = (torch.randn(8, 4, 5, 5) * 3 + 1).requires_grad_(True)
    (rn(x) * torch.randn(8, 4, 5, 5)).sum().backward()
    assert x.grad.sum((0, 2, 3)).abs().max() < 1e-4
    y = x.detach().clone().requires_grad_(True)
    ev = _bn().eval()
    (ev(y) * torch.randn(8, 4, 5, 5)).sum().backward()
    assert y.grad.sum((0, 2, 3)).abs().max() > 1e-2


def test_first_batch_initialises_running_stats_when_armed() -> None:
    rn = prepare_student(nn.Sequential(_bn()), "running", "upload")[0].train()
    x = torch.randn(16, 4, 3, 3) * 2 - 1
    out = rn(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)  # the start: the batch's statistics
    expected = F.batch_norm(x, mean, var, rn.weight, rn.bias, False, 0.0, rn.eps)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rn.running_mean, x.mean((0, 2, 3)))
    assert not rn.pending_init


def test_source_mode_learns_under_frozen_source_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _bn())
    before = get_norm_state(model)
    learning_mode(model, "source")
    assert model.training and not model[1].training
    model(torch.randn(4, 3, 8, 8))
    after = get_norm_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", ["batch", "running", "source"])
def test_student_update_runs_identically_on_the_edge(tmp_path, mode) -> None:
    """Each mode: a few cloud steps, then the published state (γ, β and running statistics) applied
    to the ONNX edge model gives the torch student's predictions in that mode within 1e-4."""
    torch.manual_seed(0)
    student = create_model("edge_cnn", 10, width=8)
    teacher = create_model("edge_cnn", 10, width=16)
    path = tmp_path / "edge.onnx"
    export_onnx(student, path, (3, 32, 32), model_name="edge_cnn", batch_stats=mode == "batch")
    runtime = EdgeRuntime(path)
    source = get_norm_state(student)
    cfg = CemaConfig(batch_size=8, replay_start=8, edge_norm=mode, student_lr=0.05)
    learner = CemaLearner(copy.deepcopy(student), teacher, cfg, num_classes=10)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    prep = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    learner.add(torch.from_numpy(prep(images)))
    while learner.step() is not None:
        pass
    state = learner.norm_state()
    moved = {k: not np.allclose(state[k], source[k]) for k in state}
    stats_moved = any(v for k, v in moved.items() if "running" in k)
    assert any(v for k, v in moved.items() if k.endswith(("weight", "bias")))
    assert stats_moved == (mode != "source")
    assert runtime.apply(state, 1) and runtime.wait_for_version(1, 60)  # in force: its session is built
    x = torch.from_numpy(runtime.prepare(images[:16]))
    model = copy.deepcopy(learner.student)
    with torch.no_grad():
        if mode == "batch":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0  # train mode for the batch's own statistics, no update
            expected = model.train()(x).numpy()
        else:
            expected = model.eval()(x).numpy()
    assert float(np.abs(runtime.predict(images[:16]) - expected).max()) < TOL
