"""ONNX export with live-swappable normalization, and the torch-free edge runtime."""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

from core.export import Preprocess, export_onnx
from core.models import SplitModel, create_model
from core.norm import get_norm_state, set_norm_state
from edge.runtime import EdgeRuntime
from protos.contract import ModelMetadata, file_sha256

TOL = 1e-4


def _perturbed(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A random but valid normalization update (positive variances)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in state.items():
        if k.endswith("running_var"):
            out[k] = (v * rng.uniform(0.3, 3.0, v.shape)).astype(np.float32)
        else:
            out[k] = (v * rng.uniform(0.5, 1.5, v.shape) + rng.normal(0, 0.2, v.shape)).astype(np.float32)
    return out


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN non-trivial running statistics, as a trained model has."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    return model.eval()


class GNLNNet(SplitModel):
    """GroupNorm + LayerNorm + BatchNorm1d: every supported kind in one graph."""

    def __init__(self) -> None:
        features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.LayerNorm(32), nn.Linear(32, 16), nn.BatchNorm1d(16),
        )
        super().__init__(features, nn.Linear(16, 5))


def _images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _parity(model: nn.Module, runtime: EdgeRuntime, images: np.ndarray) -> float:
    x = torch.from_numpy(runtime.prepare(images))
    with torch.no_grad():
        expected = model(x).numpy()
    return float(np.abs(runtime.predict(images) - expected).max())


CASES = [
    ("edge_cnn", lambda: create_model("edge_cnn", 10)),
    ("teacher_resnet", lambda: create_model("teacher_resnet", 10, width=16)),
    ("timm:resnet18", lambda: create_model("timm:resnet18", 10, image_size=32)),
    ("gn_ln", GNLNNet),
]


WAIT_S = 60.0  # a bound on a background session build, far above any measured one

# how an update is put in force: "initializers" mode rebuilds the session in the background
# (the default) or inside apply ("sync"); "inputs" mode feeds the tensors with every run
UPDATE_PATHS = [(False, True), (False, False), (True, True)]


@pytest.mark.parametrize("norm_as_inputs,background", UPDATE_PATHS,
                         ids=["initializers-background", "initializers-sync", "inputs"])
@pytest.mark.parametrize("name,factory", CASES, ids=[c[0] for c in CASES])
def test_parity_before_and_after_random_update(tmp_path, name, factory, norm_as_inputs, background) -> None:
    model = _trained_like(factory())
    path = tmp_path / "edge.onnx"
    export_onnx(model, path, (3, 32, 32), model_name=name, norm_as_inputs=norm_as_inputs)
    runtime = EdgeRuntime(path, background_updates=background)
    images = _images()
    assert _parity(model, runtime, images) <= TOL
    before = runtime.predict(images)

    update = _perturbed(get_norm_state(model), seed=1)
    set_norm_state(model, update)
    assert runtime.apply(update, version=1) is True
    assert runtime.latest_version == 1
    if not (background and not norm_as_inputs):
        assert runtime.version == 1  # in force when apply returns
    assert runtime.wait_for_version(1, WAIT_S) and runtime.version == 1
    assert _parity(model, runtime, images) <= TOL
    # the update really changed the outputs (so the parity above is not vacuous)
    assert np.abs(runtime.predict(images) - before).max() > 100 * TOL
    for k, v in runtime.norm_state().items():
        np.testing.assert_array_equal(v, update[k])


def test_metadata_describes_everything_an_edge_needs(tmp_path) -> None:
    model = create_model("edge_cnn", 3)
    info = export_onnx(model, tmp_path / "m.onnx", (3, 32, 32), class_names=["cat", "dog", "cow"],
                       model_name="edge_cnn", version=7)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(info.path)).metadata_props}
    assert meta == info.metadata
    assert json.loads(meta["fedshift.class_names"]) == ["cat", "dog", "cow"]
    assert json.loads(meta["fedshift.preprocess"]) == {"scale": 255.0, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                       "layout": "NCHW"}
    assert json.loads(meta["fedshift.norm_names"]) == list(get_norm_state(model))
    assert meta["fedshift.version"] == "7" and meta["fedshift.model"] == "edge_cnn"
    runtime = EdgeRuntime(info.path)
    assert runtime.version == 7
    assert runtime.class_names == ("cat", "dog", "cow")
    assert runtime.norm_names == tuple(get_norm_state(model))
    assert runtime.input_shape == (3, 32, 32)
    for k, v in get_norm_state(model).items():
        np.testing.assert_array_equal(runtime.norm_state()[k], v)
    # no BatchNormalization tensor was folded away by the exporter: all are named initializers
    names = {t.name for t in onnx.load(str(info.path)).graph.initializer}
    assert set(runtime.norm_names) <= names


@pytest.mark.parametrize("norm_as_inputs", [False, True], ids=["initializers", "inputs"])
def test_exported_metadata_parses_back_to_the_exporters_record(tmp_path, norm_as_inputs) -> None:
    import onnx

    model = create_model("edge_cnn", 3)
    pre = Preprocess((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    info = export_onnx(model, tmp_path / "m.onnx", (3, 32, 32), class_names=["cat", "dog", "cow"], preprocess=pre,
                       model_name="edge_cnn", version=4, norm_as_inputs=norm_as_inputs, batch_stats=True)
    record = info.metadata_record
    state = get_norm_state(model)
    assert (record.class_names, record.model_name, record.version, record.batch_stats) == \
        (("cat", "dog", "cow"), "edge_cnn", 4, True)
    assert record.preprocess == pre and record.input_shape == (3, 32, 32)
    assert record.norm_names == tuple(state) and record.norm_shapes == tuple(v.shape for v in state.values())
    assert record.norm_mode == ("inputs" if norm_as_inputs else "initializers")
    assert (record.norm_offsets is None) == norm_as_inputs
    meta = {p.key: p.value for p in onnx.load(str(info.path)).metadata_props}
    assert meta == info.metadata == record.to_metadata()
    assert ModelMetadata.from_metadata(meta) == record
    runtime = EdgeRuntime(info.path)
    assert runtime.metadata_record == record and runtime.preprocessing == pre
    assert runtime.sha256 == file_sha256(info.path) and len(runtime.sha256) == 64
    images = _images(3)
    np.testing.assert_array_equal(runtime.prepare(images), pre(images))


def test_a_file_with_the_metadata_exports_have_always_written_still_loads(tmp_path) -> None:
    """The metadata strings exactly as the exporter wrote them before protos.contract existed."""
    import onnx

    model = _trained_like(create_model("edge_cnn", 3))
    info = export_onnx(model, tmp_path / "new.onnx", (3, 32, 32), class_names=["a", "b", "c"],
                       model_name="edge_cnn", version=5)
    state = get_norm_state(model)
    names = list(state)
    legacy = {  # key order and json.dumps formatting of the pre-contract core/export.py
        "fedshift.format": "1",
        "fedshift.model": "edge_cnn",
        "fedshift.version": "5",
        "fedshift.input_name": "images",
        "fedshift.output_name": "logits",
        "fedshift.input_shape": json.dumps([None, 3, 32, 32]),
        "fedshift.preprocess": json.dumps({"scale": 255.0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                           "layout": "NCHW"}),
        "fedshift.class_names": json.dumps(["a", "b", "c"]),
        "fedshift.norm_mode": "initializers",
        "fedshift.batch_stats": "0",
        "fedshift.norm_names": json.dumps(names),
        "fedshift.norm_shapes": json.dumps([list(state[n].shape) for n in names]),
        "fedshift.norm_offsets": info.metadata["fedshift.norm_offsets"],  # where the bytes are
    }
    assert list(info.metadata.items()) == list(legacy.items())  # byte-identical strings, same order
    proto = onnx.load(str(info.path))
    del proto.metadata_props[:]
    for key, value in legacy.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    old = tmp_path / "old.onnx"
    old.write_bytes(proto.SerializeToString())
    runtime = EdgeRuntime(old)
    assert runtime.metadata_record == info.metadata_record
    assert (runtime.version, runtime.class_names, runtime.model_name) == (5, ("a", "b", "c"), "edge_cnn")
    assert _parity(model, runtime, _images()) <= TOL
    update = _perturbed(state, seed=3)
    assert runtime.apply(update, 6) and runtime.wait_for_version(6, WAIT_S)  # the offsets still point at the tensors
    set_norm_state(model, update)
    assert _parity(model, runtime, _images()) <= TOL


def test_export_rejects_bad_arguments(tmp_path) -> None:
    model = create_model("edge_cnn", 10)
    with pytest.raises(ValueError, match="class names"):
        export_onnx(model, tmp_path / "a.onnx", (3, 32, 32), class_names=["a"])
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(model, tmp_path / "a.onnx", (32, 32))
    with pytest.raises(ValueError, match="no normalization layers"):
        export_onnx(SplitModel(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)), tmp_path / "a.onnx", (3, 32, 32))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _trained_like(create_model("edge_cnn", 10))
    path = tmp_path_factory.mktemp("edge") / "edge.onnx"
    export_onnx(model, path, (3, 32, 32), model_name="edge_cnn")
    return model, path


def test_predict_accepts_uint8_nhwc_and_float_nchw_and_rejects_others(exported) -> None:
    _, path = exported
    runtime = EdgeRuntime(path)
    images = _images(4)
    logits = runtime.predict(images)
    assert logits.shape == (4, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(runtime.predict(runtime.prepare(images)), logits, atol=1e-6)
    np.testing.assert_allclose(runtime.predict(images[0]), logits[:1], atol=1e-5)
    with pytest.raises(ValueError, match=r"uint8 images must be \(N, 32, 32, 3\)"):
        runtime.predict(np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="float input must be preprocessed"):
        runtime.predict(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="unsupported input dtype"):
        runtime.predict(np.zeros((2, 3, 32, 32), np.int32))


def test_apply_validates_and_ignores_stale_versions(exported) -> None:
    model, path = exported
    runtime = EdgeRuntime(path)
    images = _images()
    base = runtime.predict(images)
    state = get_norm_state(model)
    with pytest.raises(ValueError, match="not normalization tensors"):
        runtime.apply({"classifier.weight": np.zeros((10, 64), np.float32)}, 1)
    with pytest.raises(ValueError, match="shape"):
        runtime.apply({"features.1.weight": np.zeros(5, np.float32)}, 1)
    bad = dict(state)
    bad["features.1.weight"] = np.full_like(state["features.1.weight"], np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        runtime.apply(bad, 1)
    assert runtime.version == 0
    np.testing.assert_array_equal(runtime.predict(images), base)

    partial = {"features.1.weight": state["features.1.weight"] * 2}
    assert runtime.apply(partial, 2)
    assert not runtime.apply(_perturbed(state, 9), 2)  # same version: ignored, even before it is in force
    assert not runtime.apply(_perturbed(state, 9), 1)  # older: ignored
    assert runtime.wait_for_version(2, WAIT_S) and runtime.version == 2
    np.testing.assert_array_equal(runtime.norm_state()["features.1.weight"], partial["features.1.weight"])
    np.testing.assert_array_equal(runtime.norm_state()["features.1.bias"], state["features.1.bias"])


def test_updates_while_predicting_never_tear(exported) -> None:
    """Every prediction made during a stream of updates equals one of the versions' outputs."""
    model, path = exported
    runtime = EdgeRuntime(path)
    images = _images(8)
    states = [get_norm_state(model)] + [_perturbed(get_norm_state(model), s) for s in range(1, 6)]
    reference = [runtime.predict(images)]
    for version, state in enumerate(states[1:], start=1):
        probe = EdgeRuntime(path)
        assert probe.apply(state, version) and probe.wait_for_version(version, WAIT_S)
        reference.append(probe.predict(images))
    stop = threading.Event()
    seen: list[np.ndarray] = []

    def infer() -> None:
        while not stop.is_set():
            seen.append(runtime.predict(images))

    thread = threading.Thread(target=infer)
    thread.start()
    try:
        for version, state in enumerate(states[1:], start=1):
            runtime.apply(state, version)
            runtime.wait_for_version(version, WAIT_S)  # each one in force in turn
    finally:
        stop.set()
        thread.join(timeout=30)
    assert seen
    for out in seen:
        assert min(np.abs(out - ref).max() for ref in reference) <= 1e-6
    np.testing.assert_allclose(runtime.predict(images), reference[-1], atol=1e-6)


def test_edge_runtime_runs_without_torch(exported) -> None:
    _, path = exported
    code = (
        "import sys, numpy as np; sys.modules['torch'] = None\n"
        "import edge\n"
        "from edge.runtime import EdgeRuntime\n"
        f"rt = EdgeRuntime({str(path)!r})\n"
        "x = np.zeros((2, 32, 32, 3), np.uint8)\n"
        "s = rt.norm_state(); s = {k: v * 1.5 for k, v in s.items() if k.endswith('weight')}\n"
        "assert rt.apply(s, 1) and rt.wait_for_version(1, 60) and rt.version == 1\n"
        "assert rt.backend != 'capi' or 'onnxruntime' not in sys.modules  # the C API needs no Python binding\n"
        "print(rt.predict(x).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 10)"


def test_runtime_rejects_missing_and_foreign_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="edge model not found"):
        EdgeRuntime(tmp_path / "absent.onnx")
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(nn.Linear(3, 2), (torch.zeros(1, 3),), str(plain), dynamo=False)
    with pytest.raises(ValueError, match="not a fedshift edge model"):
        EdgeRuntime(plain)


def test_export_cli(tmp_path) -> None:
    from simulations.cli import main

    out = tmp_path / "cli.onnx"
    assert main(["export", "--model", "edge_cnn", "--out", str(out), "--version", "3",
                 "--num-classes", "4", "--class-names", "a", "b", "c", "d"]) == 0
    runtime = EdgeRuntime(out)
    assert runtime.version == 3 and runtime.class_names == ("a", "b", "c", "d")
    assert main(["export", "--model", "nope", "--out", str(out)]) == 2
    assert main(["export", "--model", "edge_cnn", "--weights", str(tmp_path / "x.pt"), "--out", str(out)]) == 2



@pytest.mark.parametrize("norm_as_inputs", [False, True], ids=["initializers", "inputs"])
def test_batch_stats_export_matches_train_mode_bn(tmp_path, norm_as_inputs) -> None:
    """With batch_stats the edge normalizes with the batch's own statistics, like BN in train mode."""
    model = _trained_like(create_model("edge_cnn", 10))
    export_onnx(model, tmp_path / "b.onnx", (3, 32, 32), batch_stats=True, norm_as_inputs=norm_as_inputs)
    runtime = EdgeRuntime(tmp_path / "b.onnx")
    assert runtime.batch_stats
    images = _images(16)
    x = torch.from_numpy(runtime.prepare(images))
    update = _perturbed(get_norm_state(model), seed=2)
    set_norm_state(model, update)
    assert runtime.apply(update, 1) and runtime.wait_for_version(1, WAIT_S)
    model.train()  # batch statistics; momentum 0 keeps the running stats untouched
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    with torch.no_grad():
        expected = model(x).numpy()
        running = model.eval()(x).numpy()
    assert np.abs(runtime.predict(images) - expected).max() <= TOL
    assert np.abs(runtime.predict(images) - running).max() > 100 * TOL  # not the running-stats output
