"""protos.contract: model metadata round trip, numpy preprocessing, import hygiene."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protos.contract import KEYS, META_PREFIX, ModelMetadata, Preprocess, file_sha256

ROOT = Path(__file__).resolve().parents[1]


def _record(**kw) -> ModelMetadata:
    base = dict(input_shape=(3, 8, 8), class_names=("a", "b"), norm_names=("bn.weight", "bn.bias"),
                norm_shapes=((4,), (4,)), norm_offsets=(100, 116), model_name="edge_cnn", version=3,
                preprocess=Preprocess((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)))
    return ModelMetadata(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, {"norm_mode": "inputs", "norm_offsets": None, "batch_stats": True}],
                         ids=["initializers", "inputs"])
def test_model_metadata_round_trip(kw) -> None:
    record = _record(**kw)
    meta = record.to_metadata()
    assert all(k.startswith(META_PREFIX) and isinstance(v, str) for k, v in meta.items())
    assert (KEYS.norm_offsets in meta) == (record.norm_mode == "initializers")
    assert ModelMetadata.from_metadata({**meta, "other.key": "ignored"}) == record


def test_metadata_strings_keep_the_format_existing_files_have() -> None:
    meta = _record(preprocess=Preprocess()).to_metadata()
    assert meta[KEYS.input_shape] == "[null, 3, 8, 8]"
    assert json.loads(meta[KEYS.preprocess]) == {"scale": 255.0, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                 "layout": "NCHW"}
    assert meta[KEYS.format] == "1" and meta[KEYS.batch_stats] == "0" and meta[KEYS.version] == "3"


@pytest.mark.parametrize("key", [KEYS.norm_names, KEYS.norm_shapes, KEYS.norm_mode, KEYS.class_names,
                                 KEYS.preprocess, KEYS.input_name, KEYS.input_shape, KEYS.version,
                                 KEYS.norm_offsets])
def test_from_metadata_names_the_missing_key(key) -> None:
    meta = _record().to_metadata()
    del meta[key]
    with pytest.raises(ValueError, match=f"'{key}' missing"):
        ModelMetadata.from_metadata(meta)


def test_optional_keys_take_the_defaults_edges_always_used() -> None:
    meta = _record().to_metadata()
    for key in (KEYS.model, KEYS.batch_stats, KEYS.format, KEYS.output_name):
        del meta[key]
    record = ModelMetadata.from_metadata(meta)
    assert (record.model_name, record.batch_stats, record.format, record.output_name) == ("", False, 1, "logits")


@pytest.mark.parametrize("key,value,match", [
    (KEYS.version, "seven", "not an integer"),
    (KEYS.class_names, "{", "not JSON"),
    (KEYS.norm_names, '"x"', "JSON list"),
    (KEYS.norm_mode, "sometimes", "norm_mode"),
    (KEYS.preprocess, '{"mean": [0.5], "std": [0.0]}', "std"),
    (KEYS.format, "2", "not supported"),
])
def test_from_metadata_refuses_bad_values(key, value, match) -> None:
    with pytest.raises(ValueError, match=match):
        ModelMetadata.from_metadata({**_record().to_metadata(), key: value})


def test_model_metadata_validates() -> None:
    with pytest.raises(ValueError, match="offset"):
        _record(norm_offsets=None)
    with pytest.raises(ValueError, match="no norm offsets"):
        _record(norm_mode="inputs")
    with pytest.raises(ValueError, match="shapes"):
        _record(norm_shapes=((4,),))
    with pytest.raises(ValueError, match="input_shape"):
        _record(input_shape=(8, 8))


def test_preprocess_validates_and_round_trips() -> None:
    p = Preprocess((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 127.5)
    assert Preprocess.from_json(p.to_json()) == p
    assert Preprocess([0, 0, 0], [1, 1, 1]) == Preprocess((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # normalised
    for bad in (dict(mean=(0.5,), std=(0.5, 0.5)), dict(std=(0.5, 0.0, 0.5)), dict(scale=0.0), dict(mean=())):
        with pytest.raises(ValueError):
            Preprocess(**bad)
    with pytest.raises(ValueError, match="layout"):
        Preprocess.from_json('{"mean": [0.5], "std": [0.5], "layout": "NHWC"}')


def test_numpy_preprocess_is_the_edge_math() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 7, 6, 3), dtype=np.uint8)
    p = Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = p(images)
    assert x.dtype == np.float32 and x.shape == (5, 3, 7, 6) and x.flags.c_contiguous
    mean, std = np.array(p.mean).reshape(-1, 1, 1), np.array(p.std).reshape(-1, 1, 1)
    ref = (images.transpose(0, 3, 1, 2) / 255.0 - mean) / std
    np.testing.assert_allclose(x, ref, atol=1e-5)
    with pytest.raises(ValueError, match="images must be"):
        p(images[..., :1])


@pytest.mark.parametrize("channels,default", [(3, True), (3, False), (1, False)])
def test_numpy_preprocess_equals_training_to_tensor(channels, default) -> None:
    """The edge's numpy math and training's torch math agree, so a trained model deploys as is."""
    torch = pytest.importorskip("torch")
    from core.training import to_tensor

    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, (8, 9, 11, channels), dtype=np.uint8)
    p = Preprocess() if default else Preprocess(tuple(rng.uniform(0, 1, channels)),
                                                tuple(rng.uniform(0.1, 1, channels)), float(rng.uniform(100, 300)))
    with torch.no_grad():
        expected = (to_tensor(images) if default else to_tensor(images, p)).numpy()
    np.testing.assert_allclose(p(images), expected, atol=1e-6, rtol=0)


def test_file_sha256(tmp_path) -> None:
    import hashlib

    data = np.random.default_rng(0).bytes(3 << 20)  # several read chunks
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_contract_imports_only_numpy_and_the_stdlib() -> None:
    """Both sides of the edge/core wall import it: it must pull in neither side, nor torch/onnx."""
    code = (
        "import sys\n"
        "import protos.contract\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'onnx', 'onnxruntime', 'core', 'edge', 'server', 'client', 'simulations', 'flwr'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
    tree = ast.parse((ROOT / "protos" / "contract.py").read_text())
    top = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
           for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert top <= set(sys.stdlib_module_names) | {"numpy", "grpc", "google", "protos"}, top


def test_the_image_batch_rule_is_one_for_every_path(tmp_path) -> None:
    """check_images is what uploads (both ends), stream files and array sources apply."""
    from edge.client import CloudClient
    from protos.codec import decode_images, encode_array
    from protos.contract import check_images, save_stream_npz

    good = np.zeros((2, 4, 4, 3), np.uint8)
    assert check_images(good) is good and check_images(np.zeros((1, 4, 4, 1), np.uint8)).shape == (1, 4, 4, 1)
    for bad in (np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4, 4), np.uint8)):
        with pytest.raises(ValueError, match=r"uploads must be uint8 \(N, H, W, 1\|3\)"):
            check_images(bad, "uploads")
        with pytest.raises(ValueError, match=r"images must be uint8"):
            decode_images(encode_array(bad))
        with pytest.raises(ValueError, match=r"images must be uint8"):
            save_stream_npz(tmp_path / "s.npz", [("gauss", 3, bad, None)])
    client = CloudClient("127.0.0.1:1", "e1", "", 0.1)  # refuses before any network call
    try:
        with pytest.raises(ValueError, match=r"uploads must be uint8 \(N, H, W, 1\|3\)"):
            client.upload(np.zeros((2, 4, 4, 4), np.uint8), np.zeros(2, np.float32), 0)  # RGBA: refused here, not there
    finally:
        client.close()


def test_entropy_margin_and_token_fallback_are_the_same_on_both_ends(monkeypatch) -> None:
    import math

    from core.cema import CemaConfig
    from edge.selection import SelectionConfig
    from protos.contract import E0_FACTOR, TOKEN_ENV, entropy_margin, token_or_env

    assert CemaConfig().e0_factor == SelectionConfig().e0_factor == E0_FACTOR
    assert CemaConfig().e0(100) == SelectionConfig(num_classes=100).e0 == pytest.approx(E0_FACTOR * math.log(100))
    assert entropy_margin(0.5, 10) == pytest.approx(0.5 * math.log(10))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert token_or_env("") == "" and token_or_env("given") == "given"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert token_or_env("") == "from-env" and token_or_env("given") == "given"


def test_norm_sidecar_round_trip_and_clear_errors(tmp_path) -> None:
    from protos.contract import load_norm_sidecar, norm_sidecar_path, save_norm_sidecar

    model = tmp_path / "edge.onnx"
    state = {"bn.weight": np.arange(4, dtype=np.float64), "bn.bias": np.ones(4, np.float32)}
    assert save_norm_sidecar(model, state) == norm_sidecar_path(model) == tmp_path / "edge.norm.npz"
    back = load_norm_sidecar(model, ["bn.weight", "bn.bias"])
    assert all(v.dtype == np.float32 for v in back.values())
    np.testing.assert_array_equal(back["bn.weight"], np.arange(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"lacks norm tensors \['bn.running_mean'\]"):
        load_norm_sidecar(model, ["bn.weight", "bn.running_mean"])
    with pytest.raises(ValueError, match="are missing"):
        load_norm_sidecar(tmp_path / "other.onnx", ["bn.weight"])
