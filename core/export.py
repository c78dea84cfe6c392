"""ONNX export whose normalization state can be swapped live on a torch-free edge.

Both torch exporters fold BatchNorm into the convolutions of an eval-mode model, and then the
normalization tensors are gone. We export a copy of the model whose normalization layers read
their tensors from graph inputs named exactly like :func:`core.norm.get_norm_state`'s keys, so
no exporter can fold them. Then, by default, those inputs are turned back into *initializers with
the same names* and their byte offsets in the serialized file are written to the metadata:

- ONNX Runtime sees constants, fuses Conv+BN at session creation and runs at the speed of a plain
  fused export;
- the edge applies an update by patching those bytes in its in-memory copy of the file and
  building a new session off the inference path (milliseconds for small models); no ``onnx``
  package and no torch are needed on the edge.

``norm_as_inputs=True`` keeps them as graph inputs instead, with their values in a sidecar
``<name>.norm.npz`` (an update costs nothing, but ORT cannot fuse them: measured ~2× slower on the
small edge CNN, see benchmarks/edge_runtime.py).

Protobuf writes fields in field-number order, and ``ModelProto.graph`` (7) precedes
``metadata_props`` (14), so writing the offsets into the metadata does not move the tensors.

What the metadata holds, and how preprocessing is defined, is the edge/cloud contract: it lives in
:mod:`protos.contract` (``ModelMetadata``, ``Preprocess``) and is only written here.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.norm import get_norm_state, norm_modules
from protos.contract import (FORMAT_VERSION, INPUT_NAME, META_PREFIX, OUTPUT_NAME,  # noqa: F401 - re-exported
                             ModelMetadata, Preprocess, save_norm_sidecar)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export_onnx` wrote: ``metadata`` is the file's ``metadata_props``, parsed in
    ``metadata_record``."""

    path: Path
    norm_names: tuple[str, ...]
    norm_as_inputs: bool
    metadata: dict[str, str] = field(repr=False)
    metadata_record: ModelMetadata = field(repr=False)


class _NormFromSlot(nn.Module):
    """Stands in for a normalization layer and reads its tensors from a per-call slot."""

    def __init__(self, original: nn.Module, keys: dict[str, str], slot: dict[str, torch.Tensor],
                 batch_stats: bool = False) -> None:
        super().__init__()
        self.original = original
        self.batch_stats = batch_stats
        self.keys = keys  # tensor kind ("weight", ...) -> norm-state key
        self.slot = slot

    def _get(self, kind: str) -> torch.Tensor | None:
        key = self.keys.get(kind)
        return self.slot[key] if key is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.original
        w, b = self._get("weight"), self._get("bias")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if self._get("running_mean") is None:
                raise ValueError("BatchNorm without running statistics cannot be exported for the edge")
            if self.batch_stats:  # normalize with this batch's statistics (Tent/CEMA-style edge)
                dims = [0] + list(range(2, x.dim()))
                shape = [1, -1] + [1] * (x.dim() - 2)
                mean = x.mean(dim=dims, keepdim=True)
                var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
                return (x - mean) / torch.sqrt(var + m.eps) * w.reshape(shape) + b.reshape(shape)
            return F.batch_norm(x, self._get("running_mean"), self._get("running_var"), w, b, False, 0.0, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, w, b, m.eps)
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, w, b, m.eps)
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            return F.instance_norm(x, self._get("running_mean"), self._get("running_var"), w, b,
                                   m.running_mean is None, 0.0, m.eps)
        raise TypeError(f"unsupported normalization layer {type(m).__name__}")


class _NormInputsWrapper(nn.Module):
    """``forward(images, *norm_tensors)``: the model with its norm tensors as explicit inputs."""

    def __init__(self, model: nn.Module, batch_stats: bool = False) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.slot: dict[str, torch.Tensor] = {}
        self.names: list[str] = []
        for name, module in list(norm_modules(self.model)):
            keys = {}
            for kind in ("weight", "bias", "running_mean", "running_var"):
                if isinstance(getattr(module, kind, None), torch.Tensor):
                    keys[kind] = f"{name}.{kind}"
                    self.names.append(keys[kind])
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, _NormFromSlot(module, keys, self.slot, batch_stats))

    def forward(self, images: torch.Tensor, *norm: torch.Tensor) -> torch.Tensor:
        self.slot.clear()
        self.slot.update(zip(self.names, norm))
        return self.model(images)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: Sequence[int],
    *,
    class_names: Sequence[str] | None = None,
    preprocess: Preprocess = Preprocess(),
    model_name: str = "",
    version: int = 0,
    norm_as_inputs: bool = False,
    batch_stats: bool = False,
    opset: int = 18,
) -> ExportInfo:
    """Export ``model`` (eval mode) to ``path`` with live-swappable normalization state.

    ``input_shape`` is ``(C, H, W)`` or ``(N, C, H, W)``; the batch axis is always dynamic.
    The metadata records preprocessing, class names, the norm tensor names/shapes/offsets, the
    parameter version and the model name, so an edge needs nothing but this file.

    ``batch_stats`` makes BatchNorm layers normalize with the statistics of the batch being
    predicted (the edge "BN statistics" adaptation, and how Tent/CEMA edges predict); the running
    statistics are then still carried, so cloud updates keep one format.

    The TorchScript exporter is used on purpose: with the pinned torch it gives the same clean
    graph as the ``torch.export`` one ~20× faster (0.1 s vs 2.1 s for edge_cnn), and the latter
    could not take a dynamic batch axis together with the variadic norm inputs here.
    """
    from onnx import numpy_helper

    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {input_shape}")
    if not any(True for _ in norm_modules(model)):
        raise ValueError("model has no normalization layers: nothing to adapt on the edge")
    num_classes = _num_classes(model, shape)
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {num_classes} outputs")

    wrapper = _NormInputsWrapper(model, batch_stats)
    state = get_norm_state(model)
    norm_names = tuple(wrapper.names)
    example = (torch.zeros(shape), *[torch.from_numpy(state[n]) for n in norm_names])
    proto = _trace(wrapper, example, [INPUT_NAME, *norm_names], opset)

    if not norm_as_inputs:
        _inputs_to_initializers(proto, state, norm_names, numpy_helper)
    record = ModelMetadata(
        input_shape=shape[1:], class_names=tuple(class_names), norm_names=norm_names,
        norm_shapes=tuple(state[n].shape for n in norm_names),
        norm_mode="inputs" if norm_as_inputs else "initializers",
        norm_offsets=None if norm_as_inputs else _locate_raw_data(proto, norm_names),
        preprocess=preprocess, model_name=model_name, version=version, batch_stats=batch_stats,
        input_name=INPUT_NAME, output_name=OUTPUT_NAME,
    )
    meta = record.to_metadata()
    _set_metadata(proto, meta)
    data = proto.SerializeToString()
    if record.norm_offsets is not None:
        _check_offsets(data, state, norm_names, record.norm_offsets)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if norm_as_inputs:  # the graph has no values for its norm inputs: ship them beside it
        save_norm_sidecar(path, {n: state[n] for n in norm_names})
    log.info("exported %s (%d norm tensors, %s) to %s", model_name or type(model).__name__,
             len(norm_names), record.norm_mode, path)
    return ExportInfo(path, norm_names, norm_as_inputs, meta, record)


def _trace(wrapper: nn.Module, example: tuple, input_names: list[str], opset: int):
    import onnx

    kwargs = dict(opset_version=opset, input_names=input_names, output_names=[OUTPUT_NAME],
                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter announces its deprecation on every call; the choice is deliberate
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        buffer = io.BytesIO()
        torch.onnx.export(wrapper, example, buffer, dynamo=False, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def _num_classes(model: nn.Module, shape: tuple[int, ...]) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros((2, *shape[1:])))
    model.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"model output must be (batch, classes), got {tuple(out.shape)}")
    return int(out.shape[1])


def _inputs_to_initializers(proto, state: dict[str, np.ndarray], names: Sequence[str], numpy_helper) -> None:
    wanted = set(names)
    kept = [i for i in proto.graph.input if i.name not in wanted]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    for name in names:
        proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(state[name], np.float32), name))


def _locate_raw_data(proto, names: Sequence[str]) -> list[int]:
    """Byte offset of each named initializer's ``raw_data`` in the serialized model.

    Fills each with a distinct random pattern, serializes once and finds the patterns; the real
    values are restored afterwards (same length, so offsets hold).
    """
    rng = np.random.default_rng(12345)
    by_name = {t.name: t for t in proto.graph.initializer}
    originals = {n: by_name[n].raw_data for n in names}
    patterns = {}
    for n in names:
        length = len(originals[n])
        pattern = rng.integers(0, 256, size=max(length, 16), dtype=np.uint8).tobytes()[:length]
        patterns[n] = pattern
        by_name[n].raw_data = pattern
    data = proto.SerializeToString()
    offsets = []
    for n in names:
        pos = data.find(patterns[n])
        if pos < 0 or (len(patterns[n]) >= 8 and data.find(patterns[n], pos + 1) >= 0):
            raise RuntimeError(f"could not locate the bytes of {n} uniquely in the serialized model")
        offsets.append(pos)
        by_name[n].raw_data = originals[n]
    return offsets


def _check_offsets(data: bytes, state: dict[str, np.ndarray], names: Sequence[str], offsets: Sequence[int]) -> None:
    for name, offset in zip(names, offsets):
        expected = np.ascontiguousarray(state[name], np.float32).tobytes()
        if data[offset:offset + len(expected)] != expected:
            raise RuntimeError(f"norm tensor {name} is not at its recorded offset {offset}")


def _set_metadata(proto, meta: dict[str, str]) -> None:
    """Write :meth:`ModelMetadata.to_metadata`'s strings as they are (keys already prefixed)."""
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value
