"""Forward-only ONNX Runtime session whose normalization state is swapped live.

Torch-free: numpy + onnxruntime only, so a plain ``pip install fedshift`` on a board is enough.
The file written by ``core.export.export_onnx`` carries everything needed in its metadata
(``fedshift.*`` keys, read through :class:`protos.contract.ModelMetadata`): preprocessing, class
names, the normalization tensor names/shapes and, in the default ``initializers`` mode, their
byte offsets in the file.

Applying an update in ``initializers`` mode patches those bytes in the runtime's copy of the file
and builds a new session (ORT then fuses Conv+BN again, so inference runs at fused speed). By
default that build runs on a background thread the runtime owns (:class:`edge.swap.VersionedSwap`):
``apply`` validates the update and returns within a millisecond, predictions go on with the
version in force, and the new session replaces it atomically once built — the version in force
(``version``, and the one ``predict_versioned`` reports) only ever goes up, and
``wait_for_version`` waits for the swap. Sessions are built through ORT's C API where the wheel
ships it (:mod:`edge.sessions`), so the build does not hold the GIL either.
``background_updates=False`` builds inside ``apply`` instead (the caller blocks for the build; the
version is in force when it returns). In ``inputs`` mode the tensors are fed with every run and an
update is in force at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from edge.sessions import Session, SessionFactory
from edge.swap import SwapStats, VersionedSwap
from protos.contract import ModelMetadata, Preprocess, load_norm_sidecar

log = logging.getLogger(__name__)

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class _Serving:
    """A session and the inputs fed with every run (``inputs`` mode: the normalization state)."""

    session: Session
    bound: Any = field(default=None)  # what ``session.bind`` made of the state, or None
    owns_session: bool = True  # False in inputs mode: one session serves every version

    def run(self, feeds: Mapping[str, np.ndarray], output: str) -> np.ndarray:
        return self.session.run(feeds, output, self.bound)

    def release(self) -> None:
        if self.bound is not None and hasattr(self.bound, "close"):
            self.bound.close()
        if self.owns_session:
            self.session.close()


class EdgeRuntime:
    """Load an exported edge model, run batches, apply versioned normalization updates.

    ``predict`` accepts either uint8 images ``(N, H, W, C)`` / ``(H, W, C)`` — preprocessed with
    the model's own metadata — or already preprocessed float32 ``(N, C, H, W)``; it returns
    float32 logits ``(N, classes)``.

    ``background_updates`` (default True): ``apply`` hands the session rebuild to a builder
    thread and returns; the version is in force once predictions use it (``wait_for_version``).
    ``backend``: ``"auto"`` (ORT's C API where the wheel ships it, else the Python binding),
    ``"capi"`` or ``"python"``. Close with :meth:`close` (or leave it to garbage collection).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, background_updates: bool = True,
                 backend: str = "auto", providers: Sequence[str] = ("cpu",)) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"edge model not found: {self.path}")
        # the file's bytes, patched in place by each build (one build at a time)
        self._bytes = bytearray(self.path.read_bytes())
        self.sha256: str = hashlib.sha256(self._bytes).hexdigest()  # identifies the file to the cloud
        self._sessions = SessionFactory(backend, threads, providers)
        self.providers: list[str] = self._sessions.providers  # the execution providers in use
        session = self._sessions.build(self._bytes)
        self.metadata: dict[str, str] = session.metadata()
        try:
            record = ModelMetadata.from_metadata(self.metadata)
        except ValueError as exc:
            session.close()
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
        self._output = session.output_names[0]
        build: Callable[[State], _Serving]
        if record.norm_offsets is not None:  # "initializers" mode
            self._offsets = dict(zip(self.norm_names, record.norm_offsets))
            try:
                state = record.norm_state(self._bytes)
            except ValueError as exc:
                session.close()
                raise ValueError(f"{self.path}: {exc}") from exc
            serving, build = _Serving(session), self._build_patched
        else:
            self._offsets = {}
            self._inputs_session = session
            self._graph_inputs = frozenset(session.input_names)
            state = self._initial_inputs_state()
            serving, build = self._bind_inputs(state), self._bind_inputs
        self._swap: VersionedSwap[State, _Serving] = VersionedSwap(
            serving, state, record.version, build, release=_Serving.release,
            background=background_updates and self.norm_mode == "initializers", name=f"edge-runtime:{self.path.name}")

    # ---------------------------------------------------------------- properties

    @property
    def version(self) -> int:
        """The parameter version in force: the one the next prediction uses."""
        return self._swap.version

    @property
    def latest_version(self) -> int:
        """The newest version ``apply`` accepted: in force, or being built to be."""
        return self._swap.accepted_version

    @property
    def background_updates(self) -> bool:
        """Whether ``apply`` returns before the version is in force (the session built off its thread)."""
        return self._swap.background

    @property
    def backend(self) -> str:
        """The ORT binding the sessions are built with: ``"capi"`` or ``"python"``."""
        return self._sessions.backend

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def norm_state(self) -> dict[str, np.ndarray]:
        """A copy of the normalization state in force."""
        return {n: v.copy() for n, v in self._swap.state().items()}

    def update_stats(self) -> SwapStats:
        """Updates accepted / built / superseded / failed, and the latest build's duration."""
        return self._swap.stats()

    # ---------------------------------------------------------------- inference

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch (see the class docstring for accepted layouts)."""
        return self.predict_versioned(batch)[0]

    def predict_versioned(self, batch: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits and the parameter version that produced them (one session, one version)."""
        feeds = {self.input_name: self.prepare(batch)}
        output = self._output
        return self._swap.run(lambda serving: serving.run(feeds, output))

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
        """Accept a new normalization state as ``version``; False for a version not newer than the
        latest accepted one (stale: ignored).

        ``state`` may hold all or a subset of ``norm_names``; unknown names, wrong shapes or
        non-finite values raise ``ValueError`` and leave the runtime unchanged. Safe to call from
        another thread than ``predict``. With background updates it returns once the update is
        validated and queued: it is in force after its session is built (``wait_for_version``);
        a newer update arriving meanwhile replaces it (only the newest is built).
        """
        version = int(version)
        if version <= self._swap.accepted_version:
            log.debug("ignoring update version %d (latest: %d, in force: %d)", version,
                      self._swap.accepted_version, self._swap.version)
            return False
        arrays = self._validate(state)
        return self._swap.offer(version, lambda current: {**current, **arrays})

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Block until a version >= ``version`` is in force (predictions use it); False on timeout."""
        return self._swap.wait_for_version(version, timeout)

    def add_version_listener(self, fn: Callable[[int], None]) -> Callable[[], None]:
        """Call ``fn(version)`` each time a newer version goes into force (from the thread that
        swapped it in: keep it short). Returns a function that removes the listener."""
        return self._swap.add_listener(fn)

    def close(self) -> None:
        """Release the sessions (a build in progress finishes first). Idempotent."""
        self._swap.close()
        if self.norm_mode == "inputs":
            self._inputs_session.close()

    def __enter__(self) -> "EdgeRuntime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _build_patched(self, state: State) -> _Serving:
        """``initializers`` mode: write the whole state at its offsets, build a session (the slow part)."""
        for name, value in state.items():
            offset = self._offsets[name]
            raw = value.tobytes()
            self._bytes[offset:offset + len(raw)] = raw
        return _Serving(self._sessions.build(self._bytes))

    def _bind_inputs(self, state: State) -> _Serving:
        """``inputs`` mode: the one session, fed this state (unused tensors may be pruned from the graph)."""
        fed = {n: v for n, v in state.items() if n in self._graph_inputs}
        return _Serving(self._inputs_session, self._inputs_session.bind(fed), owns_session=False)

    def _initial_inputs_state(self) -> State:
        """In ``inputs`` mode the exported values travel as a sidecar ``.norm.npz`` file."""
        try:
            return load_norm_sidecar(self.path, self.norm_names)
        except ValueError:
            self._inputs_session.close()
            raise
