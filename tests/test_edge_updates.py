"""EdgeRuntime updates while another thread predicts: every prediction is attributable to exactly
one applied version, versions never go backwards, and waiting for a version waits for the swap."""

import copy
import threading

import numpy as np
import pytest
import torch

from core.export import export_onnx
from core.models import create_model
from core.norm import get_norm_state, set_norm_state
from edge.ort_capi import library_path
from edge.runtime import EdgeRuntime

TOL = 1e-4
WAIT_S = 60.0


def _perturbed(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in state.items():
        scale = rng.uniform(0.3, 3.0, v.shape) if k.endswith("running_var") else rng.uniform(0.5, 1.5, v.shape)
        shift = 0.0 if k.endswith("running_var") else rng.normal(0, 0.2, v.shape)
        out[k] = (v * scale + shift).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("edge_cnn", 10).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    model.eval()
    path = tmp_path_factory.mktemp("updates") / "edge.onnx"
    export_onnx(model, path, (3, 32, 32), model_name="edge_cnn")
    return model, path


def _references(model, states, x: np.ndarray) -> np.ndarray:
    """Torch logits of every version's state: (versions, N, classes)."""
    clone = copy.deepcopy(model).eval()
    out = []
    with torch.no_grad():
        for state in states:
            set_norm_state(clone, state)
            out.append(clone(torch.from_numpy(x)).numpy())
    return np.stack(out)


BACKENDS = [("capi", True, 300), ("capi", False, 60), ("python", True, 120)]


@pytest.mark.parametrize("backend,background,updates", BACKENDS,
                         ids=["capi-background", "capi-sync", "python-background"])
def test_concurrent_updates_and_predictions_are_attributable_and_monotonic(exported, backend, background,
                                                                           updates) -> None:
    if backend == "capi" and library_path() is None:
        pytest.skip("this onnxruntime wheel ships no C library")
    model, path = exported
    runtime = EdgeRuntime(path, threads=1, background_updates=background, backend=backend)
    images = np.random.default_rng(7).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    x = runtime.prepare(images)
    base = get_norm_state(model)
    states = [base] + [_perturbed(base, seed=v) for v in range(1, updates + 1)]
    reference = _references(model, states, x)
    flat = reference.reshape(len(states), -1)
    gaps = np.abs(flat[:, None, :] - flat[None, :, :]).max(axis=2) + np.eye(len(states))
    assert gaps.min() > 100 * TOL  # each version's logits are distinctive: attribution is unique

    seen: list[tuple[np.ndarray, int]] = []
    progress = threading.Condition()
    done = threading.Event()

    def predictor() -> None:
        while not done.is_set() or len(seen) < 300:
            logits, version = runtime.predict_versioned(x)
            with progress:
                seen.append((logits, version))
                progress.notify_all()

    def observed(version: int) -> bool:
        return any(v >= version for _, v in seen[-5:])

    thread = threading.Thread(target=predictor)
    thread.start()
    rng = np.random.default_rng(3)
    accepted = [0]
    try:
        for v in range(1, updates + 1):
            assert runtime.apply(states[v], v)  # always newer: always accepted
            accepted.append(v)
            if v % (updates // 6) == 0:  # now and then make sure predictions see a recent version
                assert runtime.wait_for_version(v, WAIT_S)
                with progress:
                    assert progress.wait_for(lambda: observed(v), WAIT_S)
            elif rng.random() < 0.5:
                threading.Event().wait(rng.uniform(0, 0.003))
        assert runtime.wait_for_version(updates, WAIT_S)
    finally:
        done.set()
        thread.join(WAIT_S)
    versions = [v for _, v in seen]
    assert len(seen) >= 300 and len(set(versions)) >= 7
    assert all(a <= b for a, b in zip(versions, versions[1:]))  # never backwards
    assert set(versions) <= set(accepted)
    for logits, version in seen:  # the logits are exactly that version's
        assert np.abs(logits - reference[version]).max() <= TOL, version
    logits, version = runtime.predict_versioned(x)
    assert version == runtime.version == runtime.latest_version == updates
    np.testing.assert_allclose(logits, reference[-1], atol=TOL)
    stats = runtime.update_stats()
    assert stats.accepted == updates and stats.failed == 0 and stats.built + stats.superseded == updates
    runtime.close()


def test_quick_partial_updates_both_land(exported) -> None:
    """A partial update applied while the previous one is still building keeps the previous one's tensors."""
    model, path = exported
    runtime = EdgeRuntime(path)
    state = get_norm_state(model)
    a, b = runtime.norm_names[0], runtime.norm_names[1]
    assert runtime.apply({a: state[a] * 2}, 1)
    assert runtime.apply({b: state[b] + 1}, 2)  # v1 may not be in force yet
    assert runtime.wait_for_version(2, WAIT_S)
    now = runtime.norm_state()
    np.testing.assert_array_equal(now[a], state[a] * 2)
    np.testing.assert_array_equal(now[b], state[b] + 1)
    runtime.close()


def test_version_listeners_fire_when_a_version_is_in_force(exported) -> None:
    model, path = exported
    with EdgeRuntime(path) as runtime:
        heard: list[tuple[int, int]] = []
        remove = runtime.add_version_listener(lambda v: heard.append((v, runtime.version)))
        assert runtime.apply(_perturbed(get_norm_state(model), 1), 5) and runtime.wait_for_version(5, WAIT_S)
        remove()
        assert runtime.apply(_perturbed(get_norm_state(model), 2), 6) and runtime.wait_for_version(6, WAIT_S)
        assert heard == [(5, 5)]  # in force when heard; not heard after removal
