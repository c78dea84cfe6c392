"""Edge input sources: npz stream round trip with reset flags, stdin frames, folders, npy arrays, spec
strings and bad input (the watched folder and the camera have their own test files)."""

import io
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from edge.sources import (SOURCE_HELP, SOURCE_SPECS, FolderSource, NpySource, NpzSource, StdinSource,
                          load_stream_npz, open_source, parse_frame_shape, save_stream_npz)
from simulations.cli import main as fedshift

ROOT = Path(__file__).resolve().parents[1]


def _segments(labelled: bool = True):
    rng = np.random.default_rng(0)
    out = []
    for name, n in (("gaussian_noise", 5), ("fog", 3), ("contrast", 4)):
        images = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n) if labelled else None
        out.append((name, 5, images, labels))
    return out


@pytest.mark.parametrize("protocol,expected_resets", [
    ("reset", [True, False, False, True, False, True, False]),
    ("continual", [True, False, False, False, False, False, False]),
])
def test_npz_round_trip_and_reset_flags(tmp_path, protocol, expected_resets) -> None:
    segs = _segments()
    path = save_stream_npz(tmp_path / "s.npz", segs, protocol)
    batches = list(NpzSource(path, batch_size=2))
    # batches never span segments: 5 -> 2+2+1, 3 -> 2+1, 4 -> 2+2
    assert [len(b) for b in batches] == [2, 2, 1, 2, 1, 2, 2]
    assert [b.reset for b in batches] == expected_resets
    assert [b.corruption for b in batches] == ["gaussian_noise"] * 3 + ["fog"] * 2 + ["contrast"] * 2
    assert all(b.severity == 5 and b.images.dtype == np.uint8 and b.labels.dtype == np.int64 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]),
                                  np.concatenate([s[2] for s in segs]))
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]),
                                  np.concatenate([s[3] for s in segs]))


def test_npz_keys_unlabelled_and_segment_objects(tmp_path) -> None:
    Segment = namedtuple("Segment", "corruption severity images labels")
    Stream = namedtuple("Stream", "segments protocol")
    stream = Stream([Segment(*s) for s in _segments(labelled=False)], "continual")
    path = save_stream_npz(tmp_path / "stream.data", stream)  # any suffix; protocol from the object
    assert path.name == "stream.data"
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["corruptions", "format", "images", "offsets", "protocol", "severities"]
        assert data["offsets"].tolist() == [0, 5, 8, 12] and str(data["protocol"]) == "continual"
    loaded = load_stream_npz(path)
    assert loaded.protocol == "continual" and loaded.num_samples == 12
    assert all(b.labels is None for b in NpzSource(path, 4))


def test_npz_bad_input_is_refused(tmp_path) -> None:
    segs = _segments()
    with pytest.raises(ValueError, match="protocol"):
        save_stream_npz(tmp_path / "a.npz", segs, "sometimes")
    with pytest.raises(ValueError, match="uint8"):
        save_stream_npz(tmp_path / "a.npz", [("x", 1, np.zeros((2, 6, 6, 3), np.float32), None)])
    with pytest.raises(ValueError, match="one image shape"):
        save_stream_npz(tmp_path / "a.npz", [segs[0], ("y", 1, np.zeros((2, 7, 7, 3), np.uint8), np.zeros(2, int))])
    with pytest.raises(ValueError, match="every segment has labels"):
        save_stream_npz(tmp_path / "a.npz", [segs[0], ("y", 1, segs[1][2], None)])
    with pytest.raises(ValueError, match="labels"):
        save_stream_npz(tmp_path / "a.npz", [("y", 1, segs[1][2], np.zeros(2, int))])
    with pytest.raises(FileNotFoundError):
        NpzSource(tmp_path / "missing.npz", 4)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a fedshift stream"):
        NpzSource(tmp_path / "other.npz", 4)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="npz"):
        NpzSource(tmp_path / "junk.npz", 4)
    good = save_stream_npz(tmp_path / "g.npz", segs)
    with pytest.raises(ValueError, match="batch size"):
        NpzSource(good, 0)


def test_stdin_frames_from_bytesio() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    src = StdinSource(4, 5, 3, batch_size=3, stream=io.BytesIO(frames.tobytes()))
    batches = list(src)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [b.reset for b in batches] == [True, False, False]
    assert all(b.labels is None and b.corruption == "stdin" for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), frames)


class _Trickle(io.RawIOBase):
    """A pipe that returns at most 7 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        chunk, self.data = self.data[:min(n, 7)], self.data[min(n, 7):]
        return chunk


def test_stdin_short_reads_exact_batches_and_truncation() -> None:
    frames = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    batches = list(StdinSource(4, 4, 1, batch_size=2, stream=_Trickle(frames.tobytes())))
    assert len(batches) == 1  # an exact multiple: no empty trailing batch
    np.testing.assert_array_equal(batches[0].images, frames)
    with pytest.raises(ValueError, match="truncated frame, got 5 of 16 bytes"):
        list(StdinSource(4, 4, 1, batch_size=2, stream=io.BytesIO(frames.tobytes() + b"12345")))
    assert list(StdinSource(4, 4, 1, batch_size=2, stream=io.BytesIO(b""))) == []
    with pytest.raises(ValueError, match="HxWxC"):
        StdinSource(4, 4, 2, batch_size=2, stream=io.BytesIO())


def test_folder_of_pngs_resized_and_labelled(tmp_path) -> None:
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    src = FolderSource(tmp_path / "imgs", batch_size=4, image_size=8, class_names=["dog", "cat"])
    batches = list(src)
    assert [b.images.shape for b in batches] == [(4, 8, 8, 3), (2, 8, 8, 3)]
    assert np.concatenate([b.labels for b in batches]).tolist() == [1, 1, 1, 0, 0, 0]
    assert [b.reset for b in batches] == [True, False] and batches[0].corruption == "imgs"
    gray = list(FolderSource(tmp_path / "imgs", 6, (8, 6), channels=1))
    assert gray[0].images.shape == (6, 8, 6, 1) and gray[0].labels is None


def test_folder_errors(tmp_path) -> None:
    pytest.importorskip("PIL.Image")
    with pytest.raises(FileNotFoundError):
        FolderSource(tmp_path / "nope", 2, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderSource(tmp_path / "empty", 2, 8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        list(FolderSource(tmp_path / "bad", 2, 8))


def test_folder_without_pillow_says_how_to_fix(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install Pillow"):
        FolderSource(tmp_path, 2, 8)


def test_open_source_specs(tmp_path) -> None:
    path = save_stream_npz(tmp_path / "s.npz", _segments())
    assert isinstance(open_source(f"npz:{path}", 4, (3, 6, 6)), NpzSource)
    with pytest.raises(ValueError, match="model expects"):
        open_source(f"npz:{path}", 4, (3, 8, 8))
    assert isinstance(open_source("stdin:6x6x3", 4, (3, 6, 6)), StdinSource)
    with pytest.raises(ValueError, match="model expects 6x6x3"):
        open_source("stdin:8x8x3", 4, (3, 6, 6))
    for bad in ("npz", "webcam:0", "stdin:", "stdin:8x8"):
        with pytest.raises(ValueError):
            open_source(bad, 4, (3, 6, 6))
    assert parse_frame_shape("32X32x3") == (32, 32, 3)


@pytest.mark.parametrize("protocol", ["reset", "continual"])
def test_core_stream_saved_for_the_edge_batches_identically(tmp_path, protocol) -> None:
    """The launcher's path: core.streams builds, save_stream_npz writes, the torch-free edge reads."""
    streams = pytest.importorskip("core.streams")
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    stream = streams.build_stream(images, rng.integers(0, 10, 9), corruptions=("gaussian_noise", "contrast"),
                                  severities=(5,), protocol=protocol, seed=1)
    path = save_stream_npz(tmp_path / "s.npz", stream)
    ours = list(NpzSource(path, 4))
    theirs = list(stream.batches(4))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert (a.reset, a.corruption, a.severity) == (b.reset, b.corruption, b.severity)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_the_stream_format_lives_in_protos_and_old_files_load(tmp_path) -> None:
    """edge.sources re-exports the contract's reader/writer; a file written by plain np.savez with the
    documented keys (as every earlier writer did) reads back segment by segment."""
    from edge import sources
    from protos import contract

    assert sources.save_stream_npz is contract.save_stream_npz
    assert sources.load_stream_npz is contract.load_stream_npz
    assert sources.StreamFile is contract.StreamFile and sources.STREAM_FORMAT == "fedshift.stream/1"
    segs = _segments()
    np.savez(tmp_path / "old.npz", format=np.array("fedshift.stream/1"), protocol=np.array("reset"),
             images=np.concatenate([s[2] for s in segs]), labels=np.concatenate([s[3] for s in segs]),
             corruptions=np.array([s[0] for s in segs]), severities=np.array([s[1] for s in segs]),
             offsets=np.array([0, 5, 8, 12]))
    loaded = contract.load_stream_npz(tmp_path / "old.npz")
    assert [(s.corruption, s.severity, len(s.images)) for s in loaded.segments] == \
        [("gaussian_noise", 5, 5), ("fog", 5, 3), ("contrast", 5, 4)]
    for ours, theirs in zip(loaded.segments, segs):
        np.testing.assert_array_equal(ours.images, theirs[2])
        np.testing.assert_array_equal(ours.labels, theirs[3])
    written = contract.save_stream_npz(tmp_path / "new.npz", segs)
    with np.load(written) as new, np.load(tmp_path / "old.npz") as old:
        assert sorted(new.files) == sorted(old.files)
        for key in new.files:
            np.testing.assert_array_equal(new[key], old[key])


# ------------------------------------------------------------------------------------- npy, specs


def test_npy_file_batches_exactly_and_unlabelled(tmp_path) -> None:
    images = np.random.default_rng(4).integers(0, 256, (7, 6, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "frames.npy", images)
    src = open_source(f"npy:{tmp_path / 'frames.npy'}", 3, (3, 6, 5))
    assert isinstance(src, NpySource) and src.image_shape == (6, 5, 3)
    batches = list(src)
    assert [len(b) for b in batches] == [3, 3, 1] and [b.reset for b in batches] == [True, False, False]
    assert all(b.labels is None and b.corruption == "frames" and b.severity == 0 for b in batches)
    assert all(type(b.images) is np.ndarray for b in batches)  # copied out of the memory map
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), images)
    assert [len(b) for b in NpySource(tmp_path / "frames.npy", 64)] == [7]  # and it replays


def test_npy_bad_files_are_refused(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="array file not found"):
        NpySource(tmp_path / "missing.npy", 2)
    cases = {"float.npy": np.zeros((2, 4, 4, 3), np.float32), "flat.npy": np.zeros((2, 4, 4), np.uint8),
             "rgba.npy": np.zeros((2, 4, 4, 4), np.uint8), "empty.npy": np.zeros((0, 4, 4, 3), np.uint8)}
    for name, array in cases.items():
        np.save(tmp_path / name, array)
        with pytest.raises(ValueError, match="no images" if name == "empty.npy" else r"uint8 \(N, H, W, 1\|3\)"):
            NpySource(tmp_path / name, 2)
    stream = save_stream_npz(tmp_path / "s.npz", _segments())
    with pytest.raises(ValueError, match="use npz:PATH"):
        NpySource(stream, 2)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="not a readable .npy"):
        NpySource(tmp_path / "junk.npy", 2)
    np.save(tmp_path / "ok.npy", np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="model expects"):
        open_source(f"npy:{tmp_path / 'ok.npy'}", 2, (3, 8, 8))
    with pytest.raises(ValueError, match="batch size"):
        NpySource(tmp_path / "ok.npy", 0)


def test_bad_specs_name_every_source_kind(tmp_path) -> None:
    for bad in ("npy", "watch:", "camera", "video:0", "folder"):
        with pytest.raises(ValueError) as err:
            open_source(bad, 4, (3, 6, 6))
        assert SOURCE_SPECS in str(err.value)
    with pytest.raises(FileNotFoundError, match="watched folder not found"):
        open_source(f"watch:{tmp_path / 'nope'}", 4, (3, 6, 6))
    with pytest.raises(ValueError, match="camera:0, camera:/dev/video0"):
        open_source("camera:front", 4, (3, 6, 6))
    with pytest.raises(ValueError, match="poll interval"):
        open_source(f"watch:{tmp_path}", 4, (3, 6, 6), poll_s=0)


def test_edge_help_and_config_list_the_sources(capsys) -> None:
    from edge.config import EdgeConfig
    from protos.config import to_toml

    with pytest.raises(SystemExit):
        fedshift(["edge", "--help"])
    help_text = capsys.readouterr().out
    for kind in ("npz:PATH", "npy:PATH", "folder:DIR", "watch:DIR", "camera:INDEX", "/dev/video0", "stdin:HxWxC",
                 "fedshift[camera]", "--watch-poll"):
        assert kind in help_text, kind
    assert SOURCE_HELP in help_text
    assert SOURCE_SPECS in to_toml(EdgeConfig())  # the config file's comment says it too


def test_stdin_over_a_pipe_reads_frames_and_a_signal_to_another_thread_still_stops_it() -> None:
    """The signal goes to a thread other than the main one (as the kernel may pick gRPC's): the
    main thread, waiting for frames that never come, must still run the handler -- a plain
    blocking read never returns to Python and the edge hung on SIGTERM (1 run in ~7)."""
    script = """
import os, signal, sys, threading, time
import numpy as np
from edge.sources import StdinSource

r, w = os.pipe()
os.write(w, np.arange(2 * 4 * 4 * 3, dtype=np.uint8).tobytes())  # two frames, then silence
def handler(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, handler)
both = threading.Event()
def other():
    both.wait(30)
    time.sleep(0.3)  # the main thread is waiting for a third frame by now
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # delivered to this thread, not main
threading.Thread(target=other, daemon=True).start()
seen = 0
try:
    for batch in StdinSource(4, 4, 3, batch_size=1, stream=open(r, "rb", buffering=0)):
        seen += len(batch)
        if seen == 2:
            both.set()
except KeyboardInterrupt:
    print("stopped after", seen)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "stopped after 2"


def test_stdin_through_a_descriptor_ends_cleanly_and_refuses_a_truncated_frame() -> None:
    """The descriptor path (a raw stream here, stdin in an edge): end of input, exact batches, and
    a truncated last frame; a missing or text ``sys.stdin`` does not matter when a stream is given."""
    import os

    frames = np.arange(3 * 4 * 4 * 1, dtype=np.uint8).reshape(3, 4, 4, 1)
    for tail, expect in ((b"", None), (b"12345", "truncated frame, got 5 of 16 bytes")):
        r, w = os.pipe()
        os.write(w, frames.tobytes() + tail)
        os.close(w)
        source = StdinSource(4, 4, 1, batch_size=2, stream=open(r, "rb", buffering=0))
        if expect is None:
            batches = list(source)
            assert [len(b) for b in batches] == [2, 1]
            np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), frames)
        else:
            with pytest.raises(ValueError, match=expect):
                list(source)
        source.stream.close()
    saved = sys.stdin
    try:
        sys.stdin = None
        assert list(StdinSource(1, 1, 1, 1, stream=io.BytesIO(b"ab")))[0].images.ravel().tolist() == [97]
    finally:
        sys.stdin = saved
