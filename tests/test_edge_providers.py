"""Execution providers from the config, falling back to the CPU with a warning."""

import logging

import pytest

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
