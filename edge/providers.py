"""Which ONNX Runtime execution providers an edge asks for, and what it gets.

Why a rule of its own: a board's config names the accelerator it hopes for (``CUDA`` on a
Jetson, ``TensorRT``), but the installed onnxruntime wheel decides what exists. An edge must
start anyway: providers this build lacks are dropped with a warning, and the CPU provider is
always kept last so that every operator has somewhere to run.

Names may be given in full (``CUDAExecutionProvider``) or short (``cuda``, ``tensorrt``, ``cpu``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
_SHORT = {"cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
          "trt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider",
          "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider", "rocm": "ROCMExecutionProvider",
          "xnnpack": "XnnpackExecutionProvider", "acl": "ACLExecutionProvider", "armnn": "ArmNNExecutionProvider"}


def provider_name(name: str) -> str:
    """The full ONNX Runtime name of ``name`` (short names are case-insensitive)."""
    return _SHORT.get(name.strip().lower(), name.strip())


def resolve_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """``requested`` in order, without those ``available`` lacks (each dropped one warned about),
    with the CPU provider last; an empty request means the CPU alone."""
    chosen: list[str] = []
    for name in (provider_name(n) for n in requested):
        if name in chosen:
            continue
        if name not in available:
            log.warning("execution provider %s is not in this onnxruntime build (it has %s): falling back", name,
                        ", ".join(available))
            continue
        chosen.append(name)
    if CPU in chosen:
        chosen.remove(CPU)
    return [*chosen, CPU]
