"""How the cloud's copy of an edge model normalizes, for each way the edges normalize.

The edge is forward-only; which statistics its BatchNorm layers use decides who delivers the
statistics gain under a shift (METHODS.md, "What the authors' code does"):

- ``batch``: the edge normalizes every batch with that batch's own statistics (the batch-statistics
  export). The cloud trains γ/β with BN in train mode; the running statistics it publishes are
  unused by the edge.
- ``running``: the authors' setting (``is_tbr``). The edge predicts with *running* statistics that
  only the cloud estimates, from its student's train-mode passes over uploads + replay, and sends
  with every version. The student's BN layers become :class:`RenormBatchNorm`: outputs are
  normalized with the running statistics (exactly what the edge computes), gradients flow through
  the batch statistics (batch renormalization with ``r``, ``d`` held constant), and after each pass
  the running statistics move by the layer's momentum. They start from the first batch the student
  sees in an episode (``init="upload"``, the authors': their first test batch) or from the source
  statistics (``init="source"``).
- ``source``: the edge keeps the source statistics. The student's BN layers run in eval mode while
  it learns, so γ/β are trained under the very statistics the edge applies, and those never move.

Only the student (the edge model's copy) is converted; the teacher keeps plain BN layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EDGE_NORMS: tuple[str, ...] = ("batch", "running", "source")
RUNNING_INITS: tuple[str, ...] = ("upload", "source")


class RenormBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose train-mode outputs use the running statistics and whose gradients flow
    through the batch statistics; state-dict keys are those of ``nn.BatchNorm*d``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending_init = False  # True: the next train-mode batch sets the running statistics

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        n = x.numel() // x.shape[1]
        unbiased = var.detach() * (n / max(n - 1, 1))
        if self.pending_init:
            with torch.no_grad():
                self.running_mean.copy_(mean.detach())
                self.running_var.copy_(unbiased)
            self.pending_init = False
        std = torch.sqrt(var + self.eps)
        running_std = torch.sqrt(self.running_var + self.eps)
        r = (std.detach() / running_std).view(shape)
        d = ((mean.detach() - self.running_mean) / running_std).view(shape)
        out = (x - mean.view(shape)) / std.view(shape) * r + d
        with torch.no_grad():
            m = float(self.momentum)
            self.running_mean.add_(m * (mean.detach() - self.running_mean))
            self.running_var.add_(m * (unbiased - self.running_var))
            self.num_batches_tracked.add_(1)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_renorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` (in place) by a :class:`RenormBatchNorm` holding
    the same tensors; returns ``model``."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, RenormBatchNorm):
            if not child.track_running_stats or child.momentum is None:
                raise ValueError(f"{name}: running mode needs BatchNorm layers with running statistics "
                                 "and a momentum (not a cumulative average)")
            new = RenormBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine)
            new.load_state_dict(child.state_dict())
            new.to(next(child.buffers()).device)
            setattr(model, name, new)
        else:
            convert_renorm(child)
    return model


def start_episode(model: nn.Module, init: str) -> None:
    """Arm the running statistics' start of a new episode: ``upload`` takes them from the next
    train-mode batch, ``source`` keeps the loaded ones."""
    if init not in RUNNING_INITS:
        raise ValueError(f"running init must be one of {RUNNING_INITS}, got {init!r}")
    for m in model.modules():
        if isinstance(m, RenormBatchNorm):
            m.pending_init = init == "upload"


def prepare_student(model: nn.Module, edge_norm: str, init: str = "upload") -> nn.Module:
    """The student for ``edge_norm``: converted to :class:`RenormBatchNorm` under ``running``."""
    if edge_norm not in EDGE_NORMS:
        raise ValueError(f"edge_norm must be one of {EDGE_NORMS}, got {edge_norm!r}")
    if edge_norm == "running":
        convert_renorm(model)
        start_episode(model, init)
    return model


def learning_mode(model: nn.Module, edge_norm: str) -> nn.Module:
    """Put the student in the mode its learning steps run in: train mode, except that under
    ``source`` the BatchNorm layers keep using (and never update) the source statistics."""
    model.train()
    if edge_norm == "source":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model
