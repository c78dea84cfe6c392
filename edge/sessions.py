"""Which ONNX Runtime binding the edge builds its sessions with, behind one small interface.

Why two: sessions built through ORT's C API (:mod:`edge.ort_capi`) never hold the GIL, so a
session rebuilt in the background for an update does not stall the thread that predicts; the
Python binding (``onnxruntime.InferenceSession``) holds it while it parses the model and while it
destroys a session. The C library ships inside the ``onnxruntime`` wheel on current releases;
where it does not, ``"auto"`` falls back to the Python binding, which is correct but lets an
update stall predictions for part of its build.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from edge.ort_capi import OrtCApi
from edge.providers import CPU, provider_name, resolve_providers

log = logging.getLogger(__name__)

BACKENDS = ("auto", "capi", "python")


class Session(Protocol):
    """What the runtime needs from a session, whichever binding built it."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def metadata(self) -> dict[str, str]: ...

    def bind(self, arrays: Mapping[str, np.ndarray]) -> Any: ...

    def run(self, feeds: Mapping[str, np.ndarray], output: str, bound: Any = None) -> np.ndarray: ...

    def close(self) -> None: ...


class PythonSession:
    """An ``onnxruntime.InferenceSession`` (the fallback binding)."""

    def __init__(self, model: bytes | bytearray, threads: int | None, providers: Sequence[str] = (CPU,)) -> None:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort  # only here: the C API path never loads the Python binding

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: batch-statistics exports leave tensors unused
        if threads:
            options.intra_op_num_threads = int(threads)
        self._session = ort.InferenceSession(bytes(model), options, providers=list(providers))
        self.input_names: tuple[str, ...] = tuple(i.name for i in self._session.get_inputs())
        self.output_names: tuple[str, ...] = tuple(o.name for o in self._session.get_outputs())

    def metadata(self) -> dict[str, str]:
        return dict(self._session.get_modelmeta().custom_metadata_map)

    def bind(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(arrays)

    def run(self, feeds: Mapping[str, np.ndarray], output: str, bound: Mapping[str, np.ndarray] | None = None
            ) -> np.ndarray:
        return self._session.run([output], {**feeds, **(bound or {})})[0]

    def close(self) -> None:
        self._session = None  # the binding frees it here, holding the GIL


class SessionFactory:
    """Builds sessions with one backend: ``"capi"``, ``"python"`` or ``"auto"`` (the C API where
    the wheel ships it). :attr:`backend` names the one in use, :attr:`providers` the execution
    providers (:mod:`edge.providers`: the CPU unless an accelerator the build has is asked for;
    sessions on an accelerator go through the Python binding, which appends its providers)."""

    def __init__(self, backend: str = "auto", threads: int | None = None, providers: Sequence[str] = ("cpu",)) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown session backend {backend!r} (one of {', '.join(BACKENDS)})")
        self.threads = threads
        self.providers: list[str] = [CPU]
        if any(provider_name(p) != CPU for p in providers):
            import onnxruntime as ort

            self.providers = resolve_providers(providers, ort.get_available_providers())
            if len(self.providers) > 1:
                if backend == "capi":
                    raise ValueError(f"execution providers {self.providers[:-1]} need the python session backend")
                backend = "python"
        self._api = OrtCApi.load() if backend in ("auto", "capi") else None
        if backend == "capi" and self._api is None:
            raise RuntimeError("the installed onnxruntime wheel ships no C library (onnxruntime/capi/libonnxruntime*)")
        self.backend: str = "capi" if self._api is not None else "python"
        log.debug("ONNX Runtime sessions through the %s binding", self.backend)

    def build(self, model: bytearray) -> Session:
        """A session for the serialized model (the C API reads ``model`` in place)."""
        if self._api is not None:
            return self._api.session(model, threads=self.threads)
        return PythonSession(model, self.threads, self.providers)
