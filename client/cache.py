"""A bounded per-thread cache of built model skeletons, so a worker does not rebuild the model for
every message.

Why: a simulation actor (or a deployment ClientApp process) handles many messages of one run, and
building the model (timm ``create_model`` + a seeded initialisation) costs several milliseconds
per message. Reusing one is safe because a skeleton carries no client state out of this module:
:func:`fresh_model` hands it back *exactly* as the builder made it — every parameter and buffer
(persistent or not) rewritten from a pristine copy taken at build time, gradients dropped,
``requires_grad`` flags and each submodule's train/eval mode restored. The caller then overwrites
what it must from ``Context.state`` and the message, as it would on a freshly built model.

This is deliberate, bounded global state: at most :data:`MAX_MODELS` skeletons per thread
(least recently used evicted), held in a ``threading.local`` so two messages handled at once in
one process never share a model. The caller must be done with a model before asking for the
same key again in the same thread (one message at a time per thread, as Flower runs them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

MAX_MODELS = 2  # a run uses one model; a second covers a process serving two runs in turn


@dataclass
class _Skeleton:
    model: nn.Module
    tensors: dict[str, torch.Tensor]  # pristine parameters and buffers, by name
    requires_grad: dict[str, bool]
    training: dict[str, bool]  # submodule name -> mode


_local = threading.local()


def _entries() -> "OrderedDict[Hashable, _Skeleton]":
    entries = getattr(_local, "entries", None)
    if entries is None:
        entries = _local.entries = OrderedDict()
    return entries


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def _snapshot(model: nn.Module) -> _Skeleton:
    return _Skeleton(
        model=model,
        tensors={k: t.detach().clone() for k, t in _named_tensors(model).items()},
        requires_grad={k: p.requires_grad for k, p in model.named_parameters(remove_duplicate=False)},
        training={k: m.training for k, m in model.named_modules(remove_duplicate=False)},
    )


def _restore(entry: _Skeleton) -> None:
    model = entry.model
    current = _named_tensors(model)
    if current.keys() != entry.tensors.keys():  # something added or removed tensors: do not reuse
        raise _Stale
    with torch.no_grad():
        for key, pristine in entry.tensors.items():
            tensor = current[key]
            if tensor.shape != pristine.shape or tensor.dtype != pristine.dtype:
                raise _Stale
            tensor.copy_(pristine)
    for key, param in model.named_parameters(remove_duplicate=False):
        param.grad = None
        param.requires_grad_(entry.requires_grad[key])
    modules = dict(model.named_modules(remove_duplicate=False))
    if modules.keys() != entry.training.keys():
        raise _Stale
    for key, module in modules.items():
        module.training = entry.training[key]


class _Stale(Exception):
    """A cached model's structure changed since it was built; it is rebuilt instead."""


def fresh_model(key: Hashable, build: Callable[[], M]) -> M:
    """``build()``'s model, reused from this thread's cache when ``key`` was built before.

    ``key`` must determine everything ``build`` depends on (callers pass the run's frozen config).
    The result is indistinguishable from a new ``build()``: same values, modes and flags.
    """
    entries = _entries()
    entry = entries.get(key)
    if entry is not None:
        try:
            _restore(entry)
        except _Stale:
            del entries[key]
            entry = None
    if entry is None:
        entry = _snapshot(build())
        entries[key] = entry
        while len(entries) > MAX_MODELS:
            entries.popitem(last=False)
    entries.move_to_end(key)
    return entry.model  # type: ignore[return-value]


def clear() -> None:
    """Drop this thread's cached models (tests; freeing memory)."""
    _entries().clear()
