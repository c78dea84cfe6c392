"""The base install is the edge runtime (issue 13): a fresh virtual environment with this checkout
installed as a user would (``pip install CHECKOUT``: no extras, not editable, so the wheel must
carry every module and data file), no torch in it, runs ``fedshift edge`` against a live cloud
over TLS; then ``pip install 'fedshift[camera]'`` adds OpenCV and the camera source opens through it.

The cloud runs in this test's process (it needs torch, the edge must not). The install uses the
package registries (and pip's cache) as the README's install does; on this machine the venv and
install take about 15 s, the whole test about 30 s. The copy of the checkout keeps the build
(``build/``, ``*.egg-info``) out of the work tree and stale build output out of the wheel.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the cloud side of the test

from core.cema import CemaConfig  # noqa: E402
from core.export import Preprocess, export_onnx  # noqa: E402
from core.models import create_model  # noqa: E402
from edge.summary import EdgeSummary  # noqa: E402
from protos.contract import save_stream_npz  # noqa: E402
from server.certs import make_certs  # noqa: E402
from server.cloud import CloudConfig, CloudServer  # noqa: E402

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
SAMPLES, BATCH = 32, 8
# what a user's clone holds besides the sources: never copied into the build
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "runs",
                                     ".pytest_cache", ".hypothesis", "*.onnx", "*.onnx.data")


def _env() -> dict[str, str]:
    """This environment without anything that would let the venv see the checkout or this venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "ORT_DISABLE_TELEMETRY": "1", "PYTHONNOUSERSITE": "1"}


def _run(cmd: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder outside the checkout; removed afterwards (the venv is a few hundred MB)."""
    path = tmp_path_factory.mktemp("edge-install")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def edge_venv(workdir: Path) -> Path:
    """A fresh venv with only the base install of this checkout."""
    src = workdir / "checkout"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES, symlinks=True)
    venv = workdir / "venv"
    t0 = time.monotonic()
    _ok(_run([sys.executable, "-m", "venv", venv], workdir))
    t1 = time.monotonic()
    _ok(_run([venv / "bin" / "python", "-m", "pip", "install", "--no-input", "--progress-bar", "off", src], workdir,
             timeout=900))
    log.info("edge-only install: venv %.1f s, pip install %.1f s", t1 - t0, time.monotonic() - t1)
    return venv


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    student = create_model("edge_cnn", 10, image_size=SIZE, width=8)
    student.train()
    with torch.no_grad():  # non-trivial BN statistics, as a trained model has
        for _ in range(3):
            student(torch.randn(16, 3, SIZE, SIZE) * 1.5 + 0.3)
    teacher = create_model("teacher_resnet", 10, image_size=SIZE, width=8, blocks=1)
    return student.eval(), teacher.eval()


def test_the_base_install_is_a_torch_free_edge_that_adapts_over_tls(edge_venv: Path, workdir: Path,
                                                                      models) -> None:
    py, fedshift = edge_venv / "bin" / "python", edge_venv / "bin" / "fedshift"
    # no torch, no OpenCV; the edge's modules come from the venv, with the package data
    missing = _run([py, "-c", "import torch"], workdir)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
    code = ("import sys, importlib.util, importlib.resources as r\n"
            "import edge.cli, edge.node, edge.sources, edge.watch, edge.camera, edge.runtime, protos.tls\n"
            "assert 'torch' not in sys.modules and 'core' not in sys.modules, 'the edge imported torch or core'\n"
            "assert importlib.util.find_spec('cv2') is None, 'OpenCV in the base install'\n"
            "assert (r.files('simulations') / 'scenarios' / 'default.toml').is_file(), 'scenarios not packaged'\n"
            "assert (r.files('protos') / 'fedshift' / 'v1' / 'edge.proto').is_file(), 'edge.proto not packaged'\n"
            "print(edge.__file__)")
    assert Path(_ok(_run([py, "-c", code], workdir)).strip()).is_relative_to(edge_venv)
    assert "watch:DIR" in _ok(_run([fedshift, "edge", "--help"], workdir))

    certs = make_certs(workdir / "certs", ["127.0.0.1", "localhost"], days=1)
    model = export_onnx(models[0], workdir / "edge.onnx", (3, SIZE, SIZE), model_name="edge_cnn").path
    images = np.random.default_rng(0).integers(0, 256, (SAMPLES, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, 10, SAMPLES)
    stream = save_stream_npz(workdir / "stream.npz", [("gaussian_noise", 3, images, labels)], "continual")

    no_camera = _run([fedshift, "edge", "--server", "none", "--model", model, "--source", "camera:0"], workdir)
    assert no_camera.returncode == 2 and "pip install 'fedshift[camera]'" in no_camera.stderr

    cfg = CloudConfig(image_size=SIZE, cema=CemaConfig(batch_size=4, replay_start=8), rate_interval_s=0.0, port=0,
                      tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), lockstep=True)
    server = CloudServer(models[0], models[1], cfg, preprocess=Preprocess()).start()
    try:
        assert server.transport == "TLS"
        out = workdir / "summary.json"
        run = _run([fedshift, "edge", "--server", f"127.0.0.1:{server.port}", "--tls-ca", certs.ca,
                    "--model", model, "--source", f"npz:{stream}", "--edge-id", "board-1", "--method", "all",
                    "--batch-size", BATCH, "--sync", "30", "--connect-timeout", "30", "--out", out], workdir)
        _ok(run)
        received = server.service.stats().edges["board-1"].samples
    finally:
        server.stop(grace=0.5)
    summary = EdgeSummary.read(out)
    assert summary.error is None and not summary.stopped_early
    assert summary.seen == summary.kept == summary.uploaded == received == SAMPLES  # everything seen went up
    assert (summary.upload_failed, summary.upload_dropped, summary.upload_unsent) == (0, 0, 0)
    # the cloud's learned updates came back and were put in force (not only the start-of-run reset's version)
    assert summary.updates.versions_applied >= 1 and summary.updates.apply_errors == 0
    assert summary.final_version >= summary.cloud_version > 1  # lockstep: the last upload's step is in force
    assert summary.labelled == SAMPLES and summary.uploads == SAMPLES // BATCH

    # the camera extra: OpenCV (headless) from the registry, then the camera source opens through it
    _ok(_run([py, "-m", "pip", "install", "--no-input", "--progress-bar", "off", "fedshift[camera]"], workdir,
             timeout=600))
    absent = _run([fedshift, "edge", "--server", "none", "--model", model, "--source", "camera:/dev/video97"], workdir)
    assert absent.returncode == 2 and "cannot open camera '/dev/video97'" in absent.stderr, absent.stderr
    assert _run([py, "-c", "import torch"], workdir).returncode != 0  # the extra brings no torch either
