"""The watched folder (``watch:DIR``): files appearing during the run are read once each, in arrival
order, never half-written; the source ends on the node's stop and on SIGTERM to ``fedshift edge``.

The rule tests drive the source's looks with a scripted stop event (each ``wait`` between two
looks runs the next step), so they are exact and need no timing; one test runs a real edge
process against a folder that fills while it runs."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edge.images import InputSize, read_image
from edge.summary import EdgeSummary
from edge.watch import WatchSource

Image = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parents[1]
SIZE = 8


class Script:
    """A stop event whose ``wait`` (the pause after each look) runs the next step; set after the last."""

    def __init__(self, steps: list[Callable[[], None]]) -> None:
        self.steps = list(steps)
        self.looks = 0

    def is_set(self) -> bool:
        return not self.steps and self.looks > 0

    def wait(self, timeout: float | None = None) -> bool:
        self.looks += 1
        if not self.steps:
            return True
        self.steps.pop(0)()
        return False


def _picture(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_files_arriving_during_the_run_are_read_once_each_in_arrival_order(tmp_path) -> None:
    d = tmp_path / "drop"
    d.mkdir()
    pics = {name: _picture(i) for i, name in enumerate(["00", "01", "02", "03", "04", "big"])}
    pics["big"] = _picture(9, (12, 10))  # resized by the folder source's rule
    png = {name: _png(a) for name, a in pics.items()}
    half = len(png["01"]) // 2
    (d / "00.png").write_bytes(png["00"])  # there before the edge started
    (d / "notes.txt").write_text("not an image")

    def rename(src: str, dst: str) -> Callable[[], None]:
        return lambda: os.replace(d / src, d / dst)

    steps = [
        lambda: _write(d / "01.png", png["01"][:half]),  # a writer is half-way through 01
        lambda: (_write(d / "01.png", png["01"][half:]), (d / "02.png").write_bytes(png["02"]),
                 (d / ".03.png").write_bytes(png["03"])),  # 01 finished, 02 whole, 03 under a temporary name
        lambda: (rename(".03.png", "03.png")(), _write(d / "00.png", b"trailing bytes")),  # 00 changed in place
        lambda: (d / "bad.png").write_bytes(b"this is not a png"),
        lambda: None,
        lambda: (d / "bad.png").write_bytes(png["big"]),  # the slow writer finished it after all
        lambda: ((d / ".new.png").write_bytes(png["04"]), rename(".new.png", "00.png")()),  # a new file over 00
        lambda: None,
        lambda: None,
    ]
    script = Script(steps)
    src = WatchSource(d, batch_size=2, image_size=SIZE, poll_s=0.01, stop=script)
    batches = list(src)
    order = [["00"], ["01", "02"], ["03"], ["big"], ["04"]]  # what each look found complete
    assert [len(b) for b in batches] == [len(o) for o in order]
    size = InputSize(SIZE, SIZE, 3)
    for batch, names in zip(batches, order):
        expected = [read_image(io.BytesIO(png[n]), size) for n in names]
        np.testing.assert_array_equal(batch.images, np.stack(expected))
    np.testing.assert_array_equal(batches[0].images[0], pics["00"])  # exact pixels, no resize at the model's size
    assert [b.reset for b in batches] == [True] + [False] * 4
    assert all(b.labels is None and b.corruption == "drop" and b.severity == 0 for b in batches)
    assert (src.files_read, src.files_unreadable) == (6, 1)
    assert script.looks == len(steps) == 9  # one look per step, the stop ends the last wait


def test_one_look_at_a_time(tmp_path) -> None:
    """poll() alone: a file needs two equal looks; empty and dot files never count."""
    src = WatchSource(tmp_path, batch_size=4, image_size=SIZE, poll_s=1)
    (tmp_path / "a.png").write_bytes(_png(_picture(0)))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / ".tmp.png").write_bytes(_png(_picture(1)))
    assert src.poll() == []
    assert [a.path.name for a in src.poll()] == ["a.png"]
    assert src.poll() == []  # taken off the waiting list by the look that found it complete
    os.remove(tmp_path / "a.png")
    assert src.poll() == []


def test_the_node_stop_ends_a_waiting_watch(tmp_path) -> None:
    import threading

    stop = threading.Event()
    src = WatchSource(tmp_path, batch_size=4, image_size=SIZE, poll_s=0.01, stop=stop)
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    try:
        assert list(src) == []
    finally:
        timer.cancel()


def test_watch_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="watched folder not found"):
        WatchSource(tmp_path / "nope", 2, SIZE)
    with pytest.raises(ValueError, match="poll interval must be > 0"):
        WatchSource(tmp_path, 2, SIZE, poll_s=-1)
    with pytest.raises(ValueError, match="batch size"):
        WatchSource(tmp_path, 0, SIZE)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    from _edge_fake import export_tiny_model

    return export_tiny_model(tmp_path_factory.mktemp("watch") / "edge.onnx")


def test_fedshift_edge_watches_a_folder_until_sigterm(model_path, tmp_path) -> None:
    """A torch-free edge process reads the files a writer drops into its folder while it runs, then
    stops on SIGTERM with every file counted once, its summary written and exit status 0."""
    d = tmp_path / "drop"
    d.mkdir()
    out = tmp_path / "summary.json"
    code = ("import sys; sys.modules['torch'] = None; sys.modules['core'] = None; "
            "from simulations.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "edge", "--server", "none", "--model", str(model_path),
           "--source", f"watch:{d}", "--watch-poll", "0.05", "--batch-size", "4", "--method", "all",
           "--log-every", "0", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        for i in range(7):  # dropped one by one while the edge runs, each renamed into place
            (d / f".{i}.png").write_bytes(_png(_picture(i)))
            os.replace(d / f".{i}.png", d / f"{i:02d}.png")
            time.sleep(0.02)
        deadline = time.monotonic() + 60  # bounds the wait only; the edge usually takes well under a second
        lines = []
        while time.monotonic() < deadline:  # a progress line per batch tells when all 7 were predicted
            line = proc.stderr.readline().decode()
            lines.append(line)
            if "seen 7," in line or not line:
                break
        assert any("seen 7," in ln for ln in lines), "".join(lines)
        (d / "00.png").touch()  # changing a read file does not make it new
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert rc == 0
    summary = EdgeSummary.read(out)
    assert summary.stopped_early and summary.seen == summary.kept == 7
    assert summary.per_corruption["drop"].seen == 7 and summary.resets == 1
