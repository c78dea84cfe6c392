"""The wire contract: generated stubs are fresh, the codec round-trips and refuses bad input."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from protos.codec import decode_array, decode_images, decode_state, encode_array, encode_state
from protos.fedshift.v1 import edge_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path("protos/fedshift/v1/edge.proto")
GENERATED = ("edge_pb2.py", "edge_pb2.pyi", "edge_pb2_grpc.py")


def test_generated_stubs_are_fresh(tmp_path) -> None:
    """Regenerate with grpc_tools and compare byte for byte: stubs are never edited by hand."""
    pytest.importorskip("grpc_tools")
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
           "--grpc_python_out=.", str(PROTO)]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_text()
        committed = (ROOT / PROTO.parent / name).read_text()
        assert fresh == committed, f"{name} is stale: regenerate with `{' '.join(cmd[1:])}` from the repo root"


@settings(max_examples=60, deadline=None)
@given(arrays(dtype=st.sampled_from([np.float32, np.uint8, np.int64, np.float16]),
              shape=st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)))
def test_array_round_trip(array: np.ndarray) -> None:
    back = decode_array(encode_array(array, "x"))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # decoded arrays are writable copies


def test_big_endian_and_float64_are_normalised() -> None:
    np.testing.assert_array_equal(decode_array(encode_array(np.arange(4, dtype=">i8"))), np.arange(4))
    assert decode_array(encode_array(np.ones(2))).dtype == np.float32


def test_state_round_trip_keeps_names_and_order() -> None:
    state = {"a.weight": np.ones(3, np.float32), "b.running_var": np.arange(4, dtype=np.float32)}
    back = decode_state(encode_state(state))
    assert list(back) == list(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])


@pytest.mark.parametrize("tensor,match", [
    (pb.Tensor(name="t", shape=[2, 3], dtype=pb.FLOAT32, data=b"\0" * 23), "23 bytes"),
    (pb.Tensor(name="t", shape=[2], dtype=pb.DTYPE_UNSPECIFIED, data=b"\0" * 8), "unsupported dtype"),
    (pb.Tensor(name="t", shape=[-2], dtype=pb.UINT8, data=b""), "negative"),
])
def test_malformed_tensors_are_refused(tensor: pb.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_array(tensor)


def test_state_and_image_validation() -> None:
    with pytest.raises(ValueError, match="without a name"):
        decode_state([encode_array(np.ones(2, np.float32))])
    with pytest.raises(ValueError, match="twice"):
        decode_state([encode_array(np.ones(2, np.float32), "a")] * 2)
    with pytest.raises(ValueError, match="int32"):
        encode_array(np.ones(2, np.int32))
    with pytest.raises(ValueError, match="uint8"):
        decode_images(encode_array(np.ones((2, 4, 4, 3), np.float32)))
    with pytest.raises(ValueError, match=r"\(N, H, W, 1\|3\)"):
        decode_images(encode_array(np.ones((4, 4, 3), np.uint8)))
    assert decode_images(encode_array(np.ones((2, 4, 4, 3), np.uint8))).shape == (2, 4, 4, 3)
