import subprocess
import sys

from PIL import Image

from simulations.cli import main


def test_parser_builds_without_torch() -> None:
    """The dispatcher imports no heavy stack: `fedshift edge` must run on an edge-only install."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['flwr'] = None\n"
            "from simulations.cli import build_parser; build_parser(''); build_parser('edge')\n"
            "build_parser('edge').parse_args(['edge', '--model', 'm.onnx', '--print-config'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_data_preview_and_corruption_grid(tmp_path) -> None:
    assert main(["data", "preview", "--out", str(tmp_path / "d.png"), "--image-size", "16"]) == 0
    with Image.open(tmp_path / "d.png") as img:
        assert img.format == "PNG" and img.height > 5 * 16
    assert main(["data", "corruptions", "--out", str(tmp_path / "c.png"), "--samples", "1",
                 "--image-size", "16"]) == 0
    with Image.open(tmp_path / "c.png") as img:
        assert img.format == "PNG" and img.height > 15 * 16


def test_bad_arguments_give_a_clear_error(capsys) -> None:
    assert main(["data", "preview", "--out", "/tmp/x.png", "--image-size", "4"]) == 2
    assert "image_size" in capsys.readouterr().err


def test_data_flags_are_the_benchmarks_own(capsys) -> None:
    """`fedshift data` takes its dataset settings from BuiltinData: its choices, its rules, its TOML."""
    assert main(["data", "preview", "--out", "/tmp/x.png", "--dataset", "digits-shift", "--classes", "47"]) == 2
    assert "digits-shift has 10 classes" in capsys.readouterr().err
    assert main(["data", "preview", "--dataset", "glyph-shift", "--classes", "100", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert 'dataset = "glyph-shift"' in printed and "classes = 100" in printed and "image_size = 32" in printed
    assert main(["data", "corruptions", "--dataset", "glyph-shift"]) == 2
    assert "--out FILE is required" in capsys.readouterr().err


def test_data_sizes_prints_each_clients_splits(tmp_path, monkeypatch, capsys) -> None:
    """`fedshift data sizes` counts what the FL clients get, from `fedshift fl`'s own settings:
    digits-shift's fixed fractions over the domains the run uses, and glyph-shift's per-client
    sizes for every client of every domain."""
    def rows() -> list[list[str]]:
        return [[c.strip() for c in r.split("|")[1:-1]] for r in capsys.readouterr().out.splitlines()[2:]]

    assert main(["data", "sizes"]) == 0
    five = rows()
    assert [r[1] for r in five] == ["mnist", "inverse", "mnistm", "usps", "svhn"]
    assert {(r[3], r[4]) for r in five} == {("54", "90")}
    assert sum(int(r[2]) + int(r[3]) + int(r[4]) for r in five) == 1797  # every digit, once
    assert main(["data", "sizes", "--clients", "2"]) == 0  # a 2-client run splits the digits in two
    two = rows()
    assert [r[1] for r in two] == ["mnist", "inverse"] and sum(int(r[2]) + int(r[3]) + int(r[4]) for r in two) == 1797
    monkeypatch.setenv("FEDSHIFT_CACHE", str(tmp_path))
    assert main(["data", "sizes", "--dataset", "glyph-shift", "--train-per-client", "20", "--val-per-client",
                 "10", "--test-per-client", "30", "--clients", "10", "--image-size", "16"]) == 0
    ten = rows()
    assert len(ten) == 10 and {tuple(r[2:]) for r in ten} == {("20", "10", "30", "10 / 10 / 10")}
    assert main(["data", "sizes", "--clients", "7"]) == 2
    assert "multiple of 5" in capsys.readouterr().err
