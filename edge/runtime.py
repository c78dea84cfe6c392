"""Forward-only ONNX Runtime session whose normalization state is swapped live.

Torch-free: numpy + onnxruntime only, so a plain ``pip install fedshift`` on a board is enough.
The file written by ``core.export.export_onnx`` carries everything needed in its metadata
(``fedshift.*`` keys, read through :class:`protos.contract.ModelMetadata`): preprocessing, class
names, the normalization tensor names/shapes and, in the default ``initializers`` mode, their
byte offsets in the file.

Applying an update in ``initializers`` mode patches those bytes in an in-memory copy of the file
and builds a new session (ORT then fuses Conv+BN again, so inference runs at fused speed); the
new session replaces the old one atomically, so a ``predict`` running in another thread is never
stalled or torn. In ``inputs`` mode the tensors are fed with every run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from protos.contract import ModelMetadata, Preprocess

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

log = logging.getLogger(__name__)


class EdgeRuntime:
    """Load an exported edge model, run batches, apply versioned normalization updates.

    ``predict`` accepts either uint8 images ``(N, H, W, C)`` / ``(H, W, C)`` — preprocessed with
    the model's own metadata — or already preprocessed float32 ``(N, C, H, W)``; it returns
    float32 logits ``(N, classes)``.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"edge model not found: {self.path}")
        self._bytes = bytearray(self.path.read_bytes())
        self.sha256: str = hashlib.sha256(self._bytes).hexdigest()  # identifies the file to the cloud
        self._options = ort.SessionOptions()
        # warnings only: batch-statistics exports leave running stats unused, and ORT would log
        # one line per such tensor at every session rebuild
        self._options.log_severity_level = 3
        if threads:
            self._options.intra_op_num_threads = int(threads)
        self._lock = threading.Lock()
        session = self._build(bytes(self._bytes))
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        try:
            record = ModelMetadata.from_metadata(self.metadata)
        except ValueError as exc:
            raise ValueError(f"{self.path} is not a fedshift edge model: {exc}") from exc
        self.metadata_record: ModelMetadata = record  # as the file says; ``version`` moves on with updates
        self.norm_names: tuple[str, ...] = record.norm_names
        self.norm_shapes: dict[str, tuple[int, ...]] = dict(zip(record.norm_names, record.norm_shapes))
        self.norm_mode: str = record.norm_mode
        self.class_names: tuple[str, ...] = record.class_names
        self.preprocessing: Preprocess = record.preprocess
        self.input_name: str = record.input_name
        self.input_shape: tuple[int, ...] = record.input_shape
        self.model_name: str = record.model_name
        self.batch_stats: bool = record.batch_stats
        if record.norm_offsets is not None:  # "initializers" mode
            self._offsets = dict(zip(self.norm_names, record.norm_offsets))
            try:
                self._state = record.norm_state(self._bytes)
            except ValueError as exc:
                raise ValueError(f"{self.path}: {exc}") from exc
        else:
            self._offsets = {}
            self._state = self._initial_inputs_state(session)
        self._session = session
        self._version = record.version

    # ---------------------------------------------------------------- properties

    @property
    def version(self) -> int:
        """The parameter version now in force."""
        return self._version

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def norm_state(self) -> dict[str, np.ndarray]:
        """A copy of the normalization state now in force."""
        with self._lock:
            return {n: v.copy() for n, v in self._state.items()}

    # ---------------------------------------------------------------- inference

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch (see the class docstring for accepted layouts)."""
        return self.predict_versioned(batch)[0]

    def predict_versioned(self, batch: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits and the parameter version that produced them (read with the same session)."""
        x = self.prepare(batch)
        with self._lock:
            session, state, version = self._session, self._state, self._version
        feeds = {self.input_name: x}
        if self.norm_mode == "inputs":
            feeds.update((n, v) for n, v in state.items() if n in self._graph_inputs)
        return session.run(None, feeds)[0], version

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """Validate a batch and turn it into the model's float32 NCHW input."""
        batch = np.asarray(batch)
        c, h, w = self.input_shape
        if batch.dtype == np.uint8:
            if batch.ndim == 3:
                batch = batch[None]
            if batch.ndim != 4 or batch.shape[1:] != (h, w, c):
                raise ValueError(f"uint8 images must be (N, {h}, {w}, {c}), got {batch.shape}")
            return self.preprocessing(batch)
        if batch.dtype in (np.float32, np.float64):
            if batch.ndim != 4 or batch.shape[1:] != (c, h, w):
                raise ValueError(f"float input must be preprocessed (N, {c}, {h}, {w}), got {batch.shape}")
            return np.ascontiguousarray(batch, dtype=np.float32)
        raise ValueError(f"unsupported input dtype {batch.dtype}: use uint8 NHWC or float32 NCHW")

    # ---------------------------------------------------------------- updates

    def apply(self, state: Mapping[str, np.ndarray], version: int) -> bool:
        """Put a new normalization state in force; returns False for a version not newer than ours.

        ``state`` may hold all or a subset of ``norm_names``; unknown names or wrong shapes raise
        ``ValueError`` and leave the runtime unchanged. Safe to call from another thread than
        ``predict``: the session is swapped atomically.
        """
        if version <= self._version:
            log.debug("ignoring update version %d (in force: %d)", version, self._version)
            return False
        arrays = self._validate(state)
        with self._lock:
            new_state = {**self._state, **arrays}
        if self.norm_mode == "initializers":
            patched = bytearray(self._bytes)
            for name, value in arrays.items():
                off = self._offsets[name]
                raw = value.tobytes()
                patched[off:off + len(raw)] = raw
            session = self._build(bytes(patched))
        else:
            patched, session = self._bytes, self._session
        with self._lock:
            if version <= self._version:  # a newer update won the race
                return False
            self._bytes, self._session, self._state, self._version = patched, session, new_state, version
        return True

    def _validate(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = sorted(set(state) - set(self.norm_names))
        if unknown:
            raise ValueError(f"not normalization tensors of this model: {', '.join(unknown[:8])}")
        out = {}
        for name, value in state.items():
            arr = np.ascontiguousarray(value, dtype="<f4")
            if arr.shape != self.norm_shapes[name]:
                raise ValueError(f"{name}: shape {arr.shape}, expected {self.norm_shapes[name]}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name}: non-finite values")
            out[name] = arr
        return out

    # ---------------------------------------------------------------- internals

    def _build(self, model_bytes: bytes) -> ort.InferenceSession:
        return ort.InferenceSession(model_bytes, self._options, providers=["CPUExecutionProvider"])

    def _initial_inputs_state(self, session: ort.InferenceSession) -> dict[str, np.ndarray]:
        """In ``inputs`` mode the exported values travel as a sidecar ``.norm.npz`` file."""
        sidecar = self.path.with_suffix(".norm.npz")
        if not sidecar.is_file():
            raise ValueError(f"{self.path} keeps its norm tensors as inputs; their values {sidecar} are missing")
        with np.load(sidecar) as data:
            state = {n: np.ascontiguousarray(data[n], dtype=np.float32) for n in self.norm_names}
        # unused tensors (running statistics under batch_stats) may be pruned from the graph
        self._graph_inputs = {i.name for i in session.get_inputs()}
        return state
