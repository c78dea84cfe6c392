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


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny exported edge model (tests/_edge_fake.py), one per test module."""
    from _edge_fake import export_tiny_model

    return export_tiny_model(tmp_path_factory.mktemp("edge") / "edge.onnx")


@pytest.fixture()
def cloud():
    """A fake cloud on loopback (tests/_edge_fake.py) and its address."""
    from _edge_fake import FakeCloud, serve

    fake = FakeCloud()
    with serve(fake) as address:
        yield fake, address
