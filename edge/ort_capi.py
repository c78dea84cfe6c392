"""ONNX Runtime sessions driven through ORT's C API (ctypes), so that no call holds the GIL.

Why not ``onnxruntime.InferenceSession``: its Python binding holds the GIL while it parses the
model bytes and while it destroys a session (measured on ResNet-18, 44 MB: a Python thread next
to a background rebuild stalled 77 ms median per rebuild, 18 ms even when loading from a file).
An edge rebuilds its session for every normalization update, beside the thread that predicts,
so those stalls would land in predictions. A foreign call made through :mod:`ctypes` releases
the GIL for its whole duration: building, running and releasing a session here never stops
another Python thread (measured: 7.5 ms, the same as an idle probe on this loaded machine). Only
those slow calls release it; the microsecond ones (creating a tensor view, reading a shape) keep
it, which is cheaper than handing it over.

The library is the ``libonnxruntime`` the ``onnxruntime`` wheel ships beside its Python binding
(``onnxruntime/capi/``); it is found without importing the binding. Wheels that do not ship it
make :meth:`OrtCApi.load` return ``None`` and the edge falls back to the Python binding
(:mod:`edge.sessions`).

The C API is a table of function pointers (``OrtApi``) that only ever grows: the index of each
function below is fixed by ORT's ABI for every release since API version 13 (ORT 1.13), which is
the version requested. Only float32 tensors are fed and read — what the edge models take and give.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import sys
import weakref
from ctypes import POINTER, c_char, c_char_p, c_int, c_int64, c_size_t, c_uint32, c_void_p
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

API_VERSION = 13
_FLOAT = 1  # ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
_ARENA, _MEM_DEFAULT = 1, 0  # OrtArenaAllocator, OrtMemTypeDefault
_ENABLE_ALL = 99  # GraphOptimizationLevel ORT_ENABLE_ALL, the Python binding's default too
_ERROR = 3  # OrtLoggingLevel ORT_LOGGING_LEVEL_ERROR

_P = c_void_p
_PP = POINTER(c_void_p)
# the calls that take milliseconds release the GIL (ctypes.CFUNCTYPE); the microsecond ones keep
# it (ctypes.PYFUNCTYPE): releasing and re-taking it costs more than they do, ~10 of them per run
_RELEASE_GIL = frozenset({"CreateSessionFromArray", "Run", "ReleaseSession", "CreateEnv", "ReleaseEnv"})
# name: (index in OrtApi, restype, argtypes); a c_void_p restype is an OrtStatus* (NULL: success)
_FUNCTIONS: dict[str, tuple[int, object, tuple]] = {
    "CreateStatus": (0, _P, (c_int, c_char_p)),
    "GetErrorCode": (1, c_int, (_P,)),
    "GetErrorMessage": (2, c_char_p, (_P,)),
    "CreateEnv": (3, _P, (c_int, c_char_p, _PP)),
    "CreateSessionFromArray": (8, _P, (_P, _P, c_size_t, _P, _PP)),
    "Run": (9, _P, (_P, _P, POINTER(c_char_p), _PP, c_size_t, POINTER(c_char_p), c_size_t, _PP)),
    "CreateSessionOptions": (10, _P, (_PP,)),
    "SetSessionLogSeverityLevel": (22, _P, (_P, c_int)),
    "SetSessionGraphOptimizationLevel": (23, _P, (_P, c_int)),
    "SetIntraOpNumThreads": (24, _P, (_P, c_int)),
    "SessionGetInputCount": (30, _P, (_P, POINTER(c_size_t))),
    "SessionGetOutputCount": (31, _P, (_P, POINTER(c_size_t))),
    "SessionGetInputName": (36, _P, (_P, c_size_t, _P, _PP)),
    "SessionGetOutputName": (37, _P, (_P, c_size_t, _P, _PP)),
    "CreateTensorWithDataAsOrtValue": (49, _P, (_P, _P, c_size_t, POINTER(c_int64), c_size_t, c_int, _PP)),
    "GetTensorMutableData": (51, _P, (_P, _PP)),
    "GetTensorElementType": (60, _P, (_P, POINTER(c_int))),
    "GetDimensionsCount": (61, _P, (_P, POINTER(c_size_t))),
    "GetDimensions": (62, _P, (_P, POINTER(c_int64), c_size_t)),
    "GetTensorTypeAndShape": (65, _P, (_P, _PP)),
    "CreateCpuMemoryInfo": (69, _P, (c_int, c_int, _PP)),
    "AllocatorFree": (76, _P, (_P, _P)),
    "GetAllocatorWithDefaultOptions": (78, _P, (_PP,)),
    "ReleaseEnv": (92, None, (_P,)),
    "ReleaseStatus": (93, None, (_P,)),
    "ReleaseMemoryInfo": (94, None, (_P,)),
    "ReleaseSession": (95, None, (_P,)),
    "ReleaseValue": (96, None, (_P,)),
    "ReleaseTensorTypeAndShapeInfo": (99, None, (_P,)),
    "ReleaseSessionOptions": (100, None, (_P,)),
    "SessionGetModelMetadata": (111, _P, (_P, _PP)),
    "ModelMetadataLookupCustomMetadataMap": (116, _P, (_P, _P, c_char_p, _PP)),
    "ReleaseModelMetadata": (118, None, (_P,)),
    "ModelMetadataGetCustomMetadataMapKeys": (123, _P, (_P, _P, _PP, POINTER(c_int64))),
}


class OrtError(RuntimeError):
    """An ONNX Runtime C API call failed; the message is ORT's."""


class _ApiBase(ctypes.Structure):
    _fields_ = [("GetApi", ctypes.CFUNCTYPE(_P, c_uint32)), ("GetVersionString", ctypes.CFUNCTYPE(c_char_p))]


def library_path() -> Path | None:
    """The C library the installed ``onnxruntime`` wheel ships, found without importing it."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    patterns = {"win32": ("onnxruntime.dll",), "darwin": ("libonnxruntime*.dylib",)}.get(
        sys.platform, ("libonnxruntime.so*",))
    for pattern in patterns:
        found = sorted(p for p in capi.glob(pattern) if "providers" not in p.name)
        if found:
            return found[-1]
    return None


class OrtCApi:
    """The C API functions the edge uses, plus one ORT environment (released with :meth:`close`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        lib.OrtGetApiBase.restype = POINTER(_ApiBase)
        base = lib.OrtGetApiBase().contents
        self.version: str = base.GetVersionString().decode()
        table = base.GetApi(API_VERSION)
        if not table:
            raise OrtError(f"{path}: ONNX Runtime {self.version} does not offer C API version {API_VERSION}")
        pointers = ctypes.cast(table, POINTER(c_void_p))
        self._lib = lib  # keeps the library loaded while the functions exist
        self._fn = {name: (ctypes.CFUNCTYPE if name in _RELEASE_GIL else ctypes.PYFUNCTYPE)(res, *args)(pointers[i])
                    for name, (i, res, args) in _FUNCTIONS.items()}
        self._self_test()
        self.env: int = self.out("CreateEnv", _ERROR, b"fedshift-edge")
        self.memory: int = self.out("CreateCpuMemoryInfo", _ARENA, _MEM_DEFAULT)  # describes numpy buffers
        self.allocator: int = self.out("GetAllocatorWithDefaultOptions")  # owned by ORT: never freed
        self._finalizer = weakref.finalize(self, _release_api, self._fn, self.env, self.memory)
        self._finalizer.atexit = False  # at exit a daemon builder may still be inside ORT: leave it to the OS

    @classmethod
    def load(cls) -> "OrtCApi | None":
        """The C API of the installed wheel, or ``None`` where it does not ship the library."""
        path = library_path()
        if path is None:
            return None
        try:
            return cls(path)
        except (OSError, AttributeError, OrtError) as exc:
            log.warning("ONNX Runtime C library %s unusable (%s): using the Python binding", path, exc)
            return None

    def close(self) -> None:
        """Release the environment (sessions made from it must be closed first)."""
        self._finalizer()

    # ---------------------------------------------------------------- plumbing

    def call(self, name: str, *args: object) -> None:
        """Call a status-returning function; raises :class:`OrtError` with ORT's message."""
        status = self._fn[name](*args)
        if status:
            message = self._fn["GetErrorMessage"](status).decode(errors="replace")
            self._fn["ReleaseStatus"](status)
            raise OrtError(f"{name}: {message}")

    def release(self, name: str, handle: int | None) -> None:
        """Call a ``Release*`` function (NULL is fine)."""
        if handle:
            self._fn[name](handle)

    def out(self, name: str, *args: object) -> int:
        """Call a function whose last argument is an output pointer; returns that pointer."""
        out = c_void_p()
        self.call(name, *args, ctypes.byref(out))
        return out.value

    def string(self, name: str, *args: object) -> str:
        """A string the default allocator returns (freed here)."""
        ptr = self.out(name, *args)
        if not ptr:
            return ""
        try:
            return ctypes.string_at(ptr).decode()
        finally:
            self.free(ptr)

    def tensor(self, arr: np.ndarray) -> int:
        """An OrtValue viewing a C-contiguous float32 array (which must outlive it)."""
        shape = (c_int64 * arr.ndim)(*arr.shape)
        return self.out("CreateTensorWithDataAsOrtValue", self.memory, arr.ctypes.data, arr.nbytes, shape, arr.ndim,
                        _FLOAT)

    def free(self, ptr: int) -> None:
        """Free memory the default allocator handed out."""
        self.call("AllocatorFree", self.allocator, ptr)

    def _self_test(self) -> None:
        """A wrong table would crash later; check the first entries answer as documented."""
        status = self._fn["CreateStatus"](2, b"fedshift")
        try:
            if self._fn["GetErrorCode"](status) != 2 or self._fn["GetErrorMessage"](status) != b"fedshift":
                raise OrtError("the C API table does not answer as expected")
        finally:
            self._fn["ReleaseStatus"](status)

    # ---------------------------------------------------------------- sessions

    def session(self, model: bytearray | bytes, *, threads: int | None = None) -> "CApiSession":
        """Build a CPU session from the serialized model (read in place, not copied here)."""
        return CApiSession(self, model, threads)


def _release_api(fn: dict, env: int, memory: int) -> None:
    fn["ReleaseMemoryInfo"](memory)
    fn["ReleaseEnv"](env)


class CApiSession:
    """One ORT session: :meth:`run` feeds float32 arrays by name and returns one output.

    Every C call releases the GIL. Thread-safe like ORT sessions are (concurrent runs are fine);
    :meth:`close` (or garbage collection) releases it — never while a run is in progress.
    """

    def __init__(self, api: OrtCApi, model: bytearray | bytes, threads: int | None) -> None:
        self._api = api
        options = api.out("CreateSessionOptions")
        try:
            api.call("SetSessionLogSeverityLevel", options, _ERROR)
            api.call("SetSessionGraphOptimizationLevel", options, _ENABLE_ALL)
            if threads:
                api.call("SetIntraOpNumThreads", options, int(threads))
            buffer = (c_char * len(model)).from_buffer(model) if isinstance(model, bytearray) else model
            self._handle: int = api.out("CreateSessionFromArray", api.env, buffer, len(model), options)
        finally:
            api.release("ReleaseSessionOptions", options)
        self._finalizer = weakref.finalize(self, api.release, "ReleaseSession", self._handle)
        self._finalizer.atexit = False
        self.input_names: tuple[str, ...] = self._names("SessionGetInputCount", "SessionGetInputName")
        self.output_names: tuple[str, ...] = self._names("SessionGetOutputCount", "SessionGetOutputName")
        self._name_arrays: dict[tuple[str, ...], ctypes.Array] = {}
        self._output_shapes: dict[tuple, tuple[int, ...]] = {}  # (output, *input shapes) -> its shape

    def _names(self, count_fn: str, name_fn: str) -> tuple[str, ...]:
        api, n = self._api, c_size_t()
        api.call(count_fn, self._handle, ctypes.byref(n))
        return tuple(api.string(name_fn, self._handle, i, api.allocator) for i in range(n.value))

    def metadata(self) -> dict[str, str]:
        """The model's custom metadata (``metadata_props``)."""
        api = self._api
        meta = api.out("SessionGetModelMetadata", self._handle)
        try:
            keys_ptr, count = c_void_p(), c_int64()
            api.call("ModelMetadataGetCustomMetadataMapKeys", meta, api.allocator, ctypes.byref(keys_ptr),
                     ctypes.byref(count))
            if not keys_ptr.value:
                return {}
            keys = ctypes.cast(keys_ptr, POINTER(c_void_p))
            out: dict[str, str] = {}
            try:
                for i in range(count.value):
                    key = ctypes.string_at(keys[i]).decode()
                    out[key] = api.string("ModelMetadataLookupCustomMetadataMap", meta, api.allocator,
                                           key.encode())
            finally:
                for i in range(count.value):
                    api.free(keys[i])
                api.free(keys_ptr.value)
            return out
        finally:
            api.release("ReleaseModelMetadata", meta)

    def bind(self, arrays: Mapping[str, np.ndarray]) -> "BoundInputs":
        """Inputs fed unchanged to many runs (a state fed as graph inputs), wrapped for ORT once."""
        return BoundInputs(self._api, arrays)

    def run(self, feeds: Mapping[str, np.ndarray], output: str, bound: "BoundInputs | None" = None) -> np.ndarray:
        """The named output (float32) for the float32 inputs ``feeds`` (plus ``bound``).

        Once a set of input shapes has been run, later runs with the same shapes hand ORT an
        output array of the shape it produced, so ORT writes into it (no output conversion)."""
        names = tuple(feeds)
        arrays = [np.ascontiguousarray(feeds[n], dtype=np.float32) for n in names]
        key = (output, *(a.shape for a in arrays))
        shape = self._output_shapes.get(key)
        if shape is not None:
            try:
                return self._run(names, arrays, output, bound, np.empty(shape, np.float32))
            except OrtError:  # a shape that depends on the data, not only on the input shapes
                self._output_shapes.pop(key, None)
        result = self._run(names, arrays, output, bound, None)
        if len(self._output_shapes) >= 16:  # an edge runs one or two batch sizes
            self._output_shapes.clear()
        self._output_shapes[key] = result.shape
        return result

    def _run(self, names: tuple[str, ...], arrays: list[np.ndarray], output: str, bound: "BoundInputs | None",
             result: np.ndarray | None) -> np.ndarray:
        api = self._api
        fresh: list[int] = []
        outputs = (c_void_p * 1)()
        try:
            for arr in arrays:
                fresh.append(api.tensor(arr))
            if result is not None:
                outputs[0] = api.tensor(result)
            handles = fresh + (list(bound.values) if bound is not None else [])
            all_names = names + (bound.names if bound is not None else ())
            values = (c_void_p * len(handles))(*handles)
            api.call("Run", self._handle, None, self._name_array(all_names), values, len(handles),
                     self._name_array((output,)), 1, outputs)
            return result if result is not None else self._to_numpy(outputs[0])
        finally:
            for v in (*fresh, outputs[0]):
                api.release("ReleaseValue", v)

    def _name_array(self, names: Sequence[str]) -> ctypes.Array:
        key = tuple(names)
        array = self._name_arrays.get(key)
        if array is None:  # a handful of distinct name sets per session: cache their C arrays
            array = self._name_arrays[key] = (c_char_p * len(key))(*(n.encode() for n in key))
        return array

    def _to_numpy(self, value: int) -> np.ndarray:
        api = self._api
        info = api.out("GetTensorTypeAndShape", value)
        try:
            kind, n = c_int(), c_size_t()
            api.call("GetTensorElementType", info, ctypes.byref(kind))
            if kind.value != _FLOAT:
                raise OrtError(f"output element type {kind.value} is not float32")
            api.call("GetDimensionsCount", info, ctypes.byref(n))
            dims = (c_int64 * n.value)()
            api.call("GetDimensions", info, dims, n.value)
        finally:
            api.release("ReleaseTensorTypeAndShapeInfo", info)
        shape = tuple(int(d) for d in dims)
        data = api.out("GetTensorMutableData", value)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, np.float32)
        return np.frombuffer((ctypes.c_float * count).from_address(data), dtype=np.float32).reshape(shape).copy()

    def close(self) -> None:
        """Release the session now (idempotent); the GIL is free meanwhile."""
        self._finalizer()


class BoundInputs:
    """Named float32 arrays wrapped as OrtValues once; released with :meth:`close` or collection."""

    def __init__(self, api: OrtCApi, arrays: Mapping[str, np.ndarray]) -> None:
        self.names: tuple[str, ...] = tuple(arrays)
        self._arrays = [np.ascontiguousarray(arrays[n], dtype=np.float32) for n in self.names]  # kept alive
        self.values: tuple[int, ...] = tuple(api.tensor(a) for a in self._arrays)
        self._finalizer = weakref.finalize(self, _release_values, api, self.values)
        self._finalizer.atexit = False

    def close(self) -> None:
        self._finalizer()


def _release_values(api: OrtCApi, values: tuple[int, ...]) -> None:
    for v in values:
        api.release("ReleaseValue", v)
