"""The one normalization-state utility: collect, apply, pack and select normalization layers.

CEMA adapts and ships only the normalization state of the edge model, FedBN keeps it local, and
the ONNX export exposes it as named graph inputs. All three go through this module, so the names
agree everywhere: ``"<module path>.<tensor>"`` with tensor in ``weight, bias, running_mean,
running_var`` (e.g. ``"features.1.running_var"``), exactly the model's ``state_dict`` keys.

Layers are selected by module type (BatchNorm 1d/2d/3d, GroupNorm, LayerNorm, InstanceNorm),
never by substrings of their names.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_TENSORS = ("weight", "bias", "running_mean", "running_var")


def norm_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every normalization layer, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            yield name, module


def _module_tensors(name: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for t in _TENSORS:
        value = getattr(module, t, None)
        if isinstance(value, torch.Tensor):
            yield (f"{name}.{t}" if name else t), value


def norm_tensor_names(model: nn.Module) -> list[str]:
    """The keys :func:`get_norm_state` returns, in order."""
    return [key for name, m in norm_modules(model) for key, _ in _module_tensors(name, m)]


def get_norm_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy every normalization tensor (affine γ/β and BN running statistics) to float32 numpy."""
    return {
        key: value.detach().cpu().to(torch.float32).numpy().copy()
        for name, m in norm_modules(model)
        for key, value in _module_tensors(name, m)
    }


def set_norm_state(model: nn.Module, state: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
    """Write normalization tensors into ``model`` in place (no graph or optimizer is rebuilt).

    ``strict`` requires exactly the model's keys; otherwise a subset is allowed. Unknown keys and
    shape mismatches always raise ``KeyError`` / ``ValueError``.
    """
    own = {key: value for name, m in norm_modules(model) for key, value in _module_tensors(name, m)}
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"not normalization tensors of this model: {', '.join(unknown[:8])}")
    if strict and (missing := sorted(set(own) - set(state))):
        raise KeyError(f"normalization state lacks: {', '.join(missing[:8])}")
    with torch.no_grad():
        for key, array in state.items():
            target = own[key]
            array = np.asarray(array)
            if tuple(array.shape) != tuple(target.shape):
                raise ValueError(f"{key}: shape {array.shape} does not match model {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(target.dtype))


def norm_module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy (on the CPU) of every normalization layer's whole ``state_dict``, counters included.

    Adapting a model through :func:`configure_norm_adaptation` changes these tensors and nothing
    else, so they are what a checkpoint of an adapted model needs (unlike :func:`get_norm_state`,
    which drops ``num_batches_tracked`` and converts to float32 for the wire)."""
    return {(f"{name}.{key}" if name else key): value.detach().cpu().clone()
            for name, m in norm_modules(model) for key, value in m.state_dict().items()}


def load_norm_module_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load what :func:`norm_module_state` returned (same model architecture) in place."""
    for name, m in norm_modules(model):
        prefix = f"{name}." if name else ""
        own = {key[len(prefix):]: value for key, value in state.items()
               if key.startswith(prefix) and "." not in key[len(prefix):]}
        m.load_state_dict(own, strict=True)


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine γ/β parameters of every normalization layer (what Tent/EATA/CEMA adapt)."""
    return [p for _, m in norm_modules(model) for p in (getattr(m, "weight", None), getattr(m, "bias", None))
            if isinstance(p, nn.Parameter)]


def configure_norm_adaptation(model: nn.Module) -> list[nn.Parameter]:
    """Train mode, gradients only for norm affine parameters; BN uses batch statistics.

    Returns the parameters to hand to the optimizer (Tent's ``configure_model`` +
    ``collect_params``).
    """
    model.train()
    model.requires_grad_(False)
    params = norm_affine_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def is_norm_key(model: nn.Module, key: str) -> bool:
    """Whether a ``state_dict`` key belongs to a normalization layer (FedBN keeps these local)."""
    module = key.rsplit(".", 1)[0] if "." in key else ""
    return any(module == name for name, _ in norm_modules(model))
