"""Shared test settings: quiet, single-threaded torch so tests behave on 2 shared cores."""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:  # edge-only installs run the torch-free tests
        return
    torch.set_num_threads(1)
