"""Execution providers from the config, falling back to the CPU with a warning."""

import logging

import numpy as np
import pytest
from _edge_fake import export_tiny_model

from edge.providers import CPU, provider_name, resolve_providers


def test_short_names_order_fallback_and_cpu_last(caplog: pytest.LogCaptureFixture) -> None:
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
    assert provider_name("CUDA") == "CUDAExecutionProvider" and provider_name("MyEP") == "MyEP"
    assert resolve_providers(["cuda", "tensorrt"], available) == ["CUDAExecutionProvider",
                                                                  "TensorrtExecutionProvider", CPU]
    assert resolve_providers(["cpu", "cuda"], available) == ["CUDAExecutionProvider", CPU]  # CPU always last
    assert resolve_providers([], available) == [CPU]
    with caplog.at_level(logging.WARNING):
        assert resolve_providers(["tensorrt", "cuda"], [CPU]) == [CPU]
    assert sum("falling back" in r.getMessage() for r in caplog.records) == 2


def test_an_edge_asking_for_an_absent_accelerator_runs_on_the_cpu(tmp_path, caplog) -> None:
    from edge.runtime import EdgeRuntime

    path = export_tiny_model(tmp_path / "edge.onnx")
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING):
        runtime = EdgeRuntime(path, providers=("TensorrtExecutionProvider", "cuda"))
    assert runtime.providers == [CPU] and sum("falling back" in r.getMessage() for r in caplog.records) == 2
    with EdgeRuntime(path) as plain:
        np.testing.assert_allclose(runtime.predict(images), plain.predict(images), atol=1e-6)
    runtime.close()
