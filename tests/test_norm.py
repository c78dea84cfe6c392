import numpy as np
import pytest
import torch
from torch import nn

from core.models import create_model
from core.norm import (
    configure_norm_adaptation,
    get_norm_state,
    is_norm_key,
    norm_tensor_names,
    set_norm_state,
)


class Mixed(nn.Module):
    """Norm layers of every supported kind, one named "bn" that is NOT a norm layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.Conv2d(8, 8, 1)  # a conv called "bn": must not be selected
        self.gn = nn.GroupNorm(2, 8)
        self.norm2d = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)


def _random_state(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.uniform(0.1, 2.0, v.shape) if k.endswith("running_var") else rng.normal(size=v.shape)).astype(np.float32)
            for k, v in state.items()}


def test_selected_by_type_not_name() -> None:
    names = norm_tensor_names(Mixed())
    assert names == ["gn.weight", "gn.bias", "norm2d.weight", "norm2d.bias", "norm2d.running_mean",
                     "norm2d.running_var", "ln.weight", "ln.bias"]
    assert not any(n.startswith("bn.") for n in names)
    model = Mixed()
    assert is_norm_key(model, "norm2d.num_batches_tracked") and is_norm_key(model, "gn.weight")
    assert not is_norm_key(model, "bn.weight") and not is_norm_key(model, "fc.weight")


def test_keys_are_state_dict_keys_and_round_trip() -> None:
    model = create_model("teacher_resnet", 10)
    state = get_norm_state(model)
    assert set(state) <= set(model.state_dict())
    assert all(v.dtype == np.float32 for v in state.values())
    new = _random_state(state, 0)
    set_norm_state(model, new)
    back = get_norm_state(model)
    for k in new:
        np.testing.assert_array_equal(back[k], new[k])
    # returned arrays are copies: mutating them does not touch the model
    back[next(iter(back))][...] = 123.0
    assert not np.any(get_norm_state(model)[next(iter(back))] == 123.0)


def test_set_rejects_bad_input_and_allows_subsets() -> None:
    model = create_model("edge_cnn", 10)
    state = get_norm_state(model)
    with pytest.raises(KeyError, match="not normalization tensors"):
        set_norm_state(model, {**state, "classifier.weight": np.zeros((10, 64), np.float32)})
    with pytest.raises(KeyError, match="lacks"):
        set_norm_state(model, {"features.1.weight": state["features.1.weight"]})
    with pytest.raises(ValueError, match="shape"):
        set_norm_state(model, {**state, "features.1.weight": np.zeros(3, np.float32)})
    set_norm_state(model, {"features.1.weight": np.full_like(state["features.1.weight"], 2.0)}, strict=False)
    assert np.all(get_norm_state(model)["features.1.weight"] == 2.0)


def test_configure_norm_adaptation_trains_only_affine() -> None:
    model = create_model("edge_cnn", 10)
    params = configure_norm_adaptation(model)
    assert model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("weight", "bias") for n in trainable)
    assert len(params) == len(trainable)
    assert not any(n.startswith("classifier") for n in trainable)
    conv_weight = model.features[0].weight
    assert not conv_weight.requires_grad
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert conv_weight.grad is None and all(p.grad is not None for p in params)
