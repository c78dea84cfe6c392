"""edge.ort_capi / edge.sessions: the C API sessions give exactly what the Python binding gives."""

import numpy as np
import pytest

from core.export import export_onnx
from core.models import create_model
from edge.ort_capi import OrtCApi, OrtError, library_path
from edge.sessions import PythonSession, SessionFactory

needs_capi = pytest.mark.skipif(library_path() is None, reason="this onnxruntime wheel ships no C library")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sessions")
    model = create_model("edge_cnn", 10).eval()
    export_onnx(model, folder / "init.onnx", (3, 32, 32), model_name="edge_cnn")
    export_onnx(model, folder / "inputs.onnx", (3, 32, 32), model_name="edge_cnn", norm_as_inputs=True)
    return folder


@needs_capi
def test_capi_session_matches_the_python_binding(models) -> None:
    api = OrtCApi.load()
    assert api is not None and api.version
    data = bytearray((models / "init.onnx").read_bytes())
    capi, python = api.session(data, threads=1), PythonSession(data, 1)
    assert capi.input_names == python.input_names == ("images",)
    assert capi.output_names == python.output_names == ("logits",)
    assert capi.metadata() == python.metadata() and "fedshift.norm_names" in capi.metadata()
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    expected = python.run({"images": x}, "logits")
    for _ in range(2):  # the second run writes into an output array of the shape the first one produced
        np.testing.assert_array_equal(capi.run({"images": x}, "logits"), expected)
    np.testing.assert_array_equal(capi.run({"images": x[:2]}, "logits"), expected[:2])
    assert capi.run({"images": x[:0]}, "logits").shape == (0, 10)
    with pytest.raises(OrtError, match="dimensions"):
        capi.run({"images": x[:, :2]}, "logits")
    capi.close()
    capi.close()  # idempotent


@needs_capi
def test_capi_bound_inputs_match_the_python_binding(models) -> None:
    api = OrtCApi.load()
    data = bytearray((models / "inputs.onnx").read_bytes())
    with np.load(models / "inputs.norm.npz") as npz:
        state = {k: npz[k] for k in npz.files}
    capi, python = api.session(data, threads=1), PythonSession(data, 1)
    fed = {k: v for k, v in state.items() if k in capi.input_names}
    x = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    bound = capi.bind(fed)
    np.testing.assert_array_equal(capi.run({"images": x}, "logits", bound),
                                  python.run({"images": x}, "logits", python.bind(fed)))
    bound.close()
    capi.close()


@needs_capi
def test_a_malformed_model_is_an_ort_error() -> None:
    api = OrtCApi.load()
    with pytest.raises(OrtError, match="CreateSessionFromArray"):
        api.session(bytearray(b"not an onnx model"))


def test_factory_picks_a_backend_and_refuses_unknown_ones() -> None:
    assert SessionFactory("python").backend == "python"
    assert SessionFactory("auto").backend == ("capi" if library_path() is not None else "python")
    with pytest.raises(ValueError, match="unknown session backend"):
        SessionFactory("tensorrt")
