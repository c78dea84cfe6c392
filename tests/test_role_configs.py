"""Role contracts: config files, generated flags, --print-config, and typed summaries that refuse
what breaks their invariants."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace

import pytest

from edge.config import EdgeConfig
from edge.selection import SelectionConfig
from edge.summary import EdgeSummary, Excluded, ModelRef, ShiftStats
from protos.config import add_config_flags, coerce, from_mapping, load_config, option, resolve, section, to_toml
from server.config import CloudConfig
from server.stats import CloudStats, EdgeStats, LearnerStats
from simulations.adapt import AdaptConfig
from simulations.cli import main as fedshift


@pytest.mark.parametrize("role, extra", [("edge", ["--model", "m.onnx", "--batch-size", "16", "--redundancy", "0.4"]),
                                         ("cloud", ["--port", "0", "--student-lr", "0.02", "--no-replay"]),
                                         ("adapt", ["--edges", "2", "--edge-batch-size", "8", "--cloud-device", "cuda"])])
def test_print_config_round_trip(role, extra, tmp_path, capsys) -> None:
    assert fedshift([role, *extra, "--print-config"]) == 0
    first = capsys.readouterr().out
    path = tmp_path / f"{role}.toml"
    path.write_text(first)
    assert fedshift([role, "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == first


def test_flags_override_the_file_and_land_in_their_section(tmp_path, capsys) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('model = "a.onnx"\nbatch_size = 8\n[selection]\nmethod = "eata"\nwarmup = 7\n')
    assert fedshift(["edge", "--config", str(path), "--batch-size", "32", "--warmup", "3", "--print-config"]) == 0
    cfg = from_mapping(EdgeConfig, __import__("tomllib").loads(capsys.readouterr().out))
    assert (cfg.model, cfg.batch_size) == ("a.onnx", 32)  # the flag wins, the rest of the file stays
    assert (cfg.selection.method, cfg.selection.warmup) == ("eata", 3)
    # the adapt launcher's templates take prefixed flags, nested sections included
    assert fedshift(["adapt", "--edge-warmup", "5", "--cloud-student-lr", "0.5", "--print-config"]) == 0
    a = from_mapping(AdaptConfig, __import__("tomllib").loads(capsys.readouterr().out))
    assert a.edge.selection.warmup == 5 and a.cloud.cema.student_lr == 0.5


def test_unknown_keys_and_wrong_types_are_refused_by_name(tmp_path, capsys) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text("port = 1\n[cema]\nstudent_rl = 0.1\n")
    assert fedshift(["cloud", "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'student_rl' in [cema]" in err and "student_lr" in err and str(path) in err
    path.write_text('batch_size = "big"\n')
    with pytest.raises(ValueError, match="batch_size: expected int"):
        load_config(EdgeConfig, path)
    with pytest.raises(ValueError, match="unknown key 'bogus' in the top level; valid keys: server, model"):
        from_mapping(EdgeConfig, {"bogus": 1})
    with pytest.raises(SystemExit):
        fedshift(["edge", "--batch-size", "many"])
    assert "--batch-size: expected int" in capsys.readouterr().err


def test_edge_refuses_to_run_without_its_required_settings(capsys) -> None:
    assert fedshift(["edge", "--model", "m.onnx"]) == 2
    assert "missing setting(s) server, source" in capsys.readouterr().err


def test_coerce_is_strict_for_typed_sources_and_parses_text() -> None:
    assert coerce(3, float, "k") == 3.0 and coerce(4.0, int, "k") == 4
    with pytest.raises(ValueError):
        coerce("3", int, "k")  # TOML gave a string: refused
    assert coerce("3", int, "k", text=True) == 3 and coerce("false", bool, "k", text=True) is False
    assert coerce("none", float | None, "k", text=True) is None and coerce("a,b", tuple[str, ...], "k", text=True) == ("a", "b")
    with pytest.raises(ValueError):
        coerce(True, int, "k")  # a bool is not a number


@dataclass(frozen=True)
class _Inner:
    seed: int = option(0, "inner seed")


@dataclass(frozen=True)
class _Outer:
    seed: int = option(0, "outer seed")
    inner: _Inner = section(_Inner)


def test_duplicate_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="--seed would set both seed and inner.seed"):
        add_config_flags(argparse.ArgumentParser(), _Outer)


def test_resolved_config_keeps_validation() -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, CloudConfig)
    with pytest.raises(ValueError, match="max_workers"):
        resolve(CloudConfig, parser.parse_args(["--max-workers", "0"]))
    cfg = resolve(CloudConfig, parser.parse_args(["--image-size", "16", "--in-chans", "1"]))
    assert cfg.image_shape == (16, 16, 1)
    assert "token" in to_toml(cfg) and CloudConfig().to_dict()["token"] == ""


def _summary(**kw) -> EdgeSummary:
    base = dict(edge_id="e", server="127.0.0.1:1", method="all", selection=SelectionConfig(num_classes=10),
                model=ModelRef(name="m", path="m.onnx", sha256="ab", num_classes=10, input_shape=(3, 8, 8)),
                seen=10, batches=2, kept=10, uploaded=10, labelled=10, correct=7,
                per_corruption={"fog": ShiftStats(seen=10, labelled=10, correct=7, kept=10, uploaded=10)})
    return EdgeSummary(**{**base, **kw})


def test_edge_summary_round_trip_and_refused_invariants() -> None:
    s = _summary()
    assert EdgeSummary.from_json(s.to_json()) == s and s.accuracy == 0.7
    on_disk = json.loads(s.to_json())
    assert on_disk["schema"] == "fedshift.edge-summary/1" and on_disk["accuracy"] == 0.7
    for key, value, why in (("uploaded", 9, "uploaded 9 . failed 0 != kept 10"),
                            ("kept", 9, "kept 9 . excluded 0 != seen 10"),
                            ("correct", 11, "correct 11")):
        broken = dict(on_disk, **{key: value})
        with pytest.raises(ValueError, match=why):
            EdgeSummary.from_json(json.dumps(broken))
    with pytest.raises(ValueError, match="schema"):
        EdgeSummary.from_json(json.dumps(dict(on_disk, schema="fedshift.edge-summary/0")))
    with pytest.raises(ValueError, match="unknown key 'uploadd'"):
        EdgeSummary.from_json(json.dumps(dict(on_disk, uploadd=3)))
    with pytest.raises(ValueError, match="uploads without a cloud"):
        _summary(server=None)
    assert _summary(kept=4, uploaded=4, excluded=Excluded(unreliable=6),
                    per_corruption={"fog": ShiftStats(10, 10, 7, 4, 4)}).kept_rate == 0.4


def test_cloud_stats_invariants() -> None:
    stats = CloudStats(edges={"e": EdgeStats(uploads=2, samples=8, learner="e")},
                       learners={"e": LearnerStats(version=3)}, uploads=2, samples=8)
    assert CloudStats.from_json(stats.to_json()) == stats
    with pytest.raises(ValueError, match="samples"):
        CloudStats.from_json(json.dumps(dict(stats.to_dict(), samples=9)))
    with pytest.raises(ValueError, match="unknown learners"):
        replace(stats, learners={})


def test_edge_config_sections_are_the_selection_config() -> None:
    cfg = EdgeConfig(selection=SelectionConfig(method="random", random_rate=0.5))
    assert cfg.selection.num_classes == 0 and cfg.selection.for_classes(4).num_classes == 4
    with pytest.raises(ValueError, match="set for 3 classes"):
        SelectionConfig(num_classes=3).for_classes(4)


def test_adapt_refuses_template_fields_the_launcher_owns(capsys) -> None:
    with pytest.raises(ValueError, match="edge.node.limit is set by the launcher for each child; set limit instead"):
        AdaptConfig(edge=EdgeConfig(node=__import__("edge.config").config.NodeConfig(limit=5)))
    with pytest.raises(ValueError, match="cloud.cema.method is set by the launcher"):
        AdaptConfig(cloud=CloudConfig(cema=replace(CloudConfig().cema, method="tent")))
    assert fedshift(["adapt", "--edge-token", "s3cret", "--print-config"]) == 2
    assert "$FEDSHIFT_TOKEN" in capsys.readouterr().err  # secrets never land in a run folder's files
    with pytest.raises(ValueError, match="must agree"):
        AdaptConfig(edge=EdgeConfig(selection=SelectionConfig(e0_factor=0.5)))


def test_help_shows_the_resolved_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        fedshift(["adapt", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(pair with a lockstep cloud; 0: never wait) (default: 2.0)" in text  # the adapt template's, not 0.0
    assert "(default: the whole stream) (default" not in text


def test_non_finite_values_survive_files_and_records(tmp_path) -> None:
    cfg = AdaptConfig(timeout_s=float("inf"))
    path = tmp_path / "a.toml"
    path.write_text(to_toml(cfg))
    assert load_config(AdaptConfig, path) == cfg
    s = _summary(wall_s=float("inf"))
    assert EdgeSummary.from_json(s.to_json()) == s  # JSON has no inf: written as "inf", read back as a float


def test_builtin_data_spec_is_validated_and_shared() -> None:
    from core.data.builtin import BuiltinData
    from core.fl_config import FLConfig

    with pytest.raises(ValueError, match="digits-shift has 10 classes"):
        BuiltinData("digits-shift", 47)
    with pytest.raises(ValueError, match="not built in"):
        BuiltinData("mnist-c")
    with pytest.raises(ValueError, match=r"class sets of \[10, 47, 100\], not 13"):
        BuiltinData("glyph-shift", 13)
    assert BuiltinData("glyph-shift", 47).class_names()[:12] == tuple("0123456789AB")
    fl = FLConfig.from_run_config({"dataset": "glyph-shift", "classes": "100", "test-per-client": 50})
    assert fl.data == BuiltinData("glyph-shift", 100, test_per_client=50)
    with pytest.raises(ValueError, match="digits-shift has 10 classes"):
        FLConfig.from_run_config({"classes": 47})
    a = AdaptConfig(data=BuiltinData("glyph-shift", 47))
    parser = argparse.ArgumentParser()
    add_config_flags(parser, AdaptConfig)
    assert a.data.classes == 47 and "--classes" in parser.format_help()


def test_shared_student_and_per_edge_model_files_are_refused_together() -> None:
    from server.config import CloudConfig

    with pytest.raises(ValueError, match="drop shared or edge_models"):
        CloudConfig(shared=True, edge_models=("a.onnx",))
