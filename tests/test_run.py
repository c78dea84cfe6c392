"""`fedshift run`: the tiny scenario end to end, reproducibility, and clean interruption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.summary import EdgeSummary
from protos.contract import file_sha256
from simulations.results import RunResults


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "simulations.cli", "run", "tiny", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _numbers(run: Path) -> dict:
    fl = json.loads((run / "fl" / "fedbn" / "results.json").read_text())
    ad = json.loads((run / "adapt" / "results.json").read_text())
    return {"fl": fl["per_client_accuracy"], "fl_history": [h["mean_accuracy"] for h in fl["history"]],
            "acc": ad["accuracy"], "no_adapt": ad["no_adapt_accuracy"],
            **{k: ad[k] for k in ("seen", "uploaded", "bytes_up", "bytes_down", "versions_applied")}}


@pytest.mark.slow
def test_tiny_scenario_end_to_end_is_reproducible(tmp_path) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        out = _run(run, "--set", "resources.cache=" + str(tmp_path / "cache"))
        assert out.returncode == 0, out.stderr[-3000:]
    a = runs[0]
    for path in ("report.md", "scenario.toml", "stages.json", "command.txt", "export/edge.onnx",
                 "fl/fedbn/results.json", "fl/fedbn/checkpoint.pt", "adapt/results.json", "data/domains.png",
                 "plots/fl_accuracy.png", "plots/edge_accuracy.png"):
        assert (a / path).is_file(), path
    assert set(json.loads((a / "stages.json").read_text())) == {"data", "fl", "export", "adapt", "report"}
    assert list(a.glob("fl/fedbn/**/events.out.tfevents.*")), "FL TensorBoard events"
    assert list(a.glob("adapt/cloud/events.out.tfevents.*")), "cloud TensorBoard events"
    assert list(a.glob("adapt/edges/edge0/events.out.tfevents.*")), "edge TensorBoard events"
    report = (a / "report.md").read_text()
    assert "## Federated training" in report and "## Cloud-edge adaptation" in report
    assert "tensorboard --logdir" in report
    # contracts: children started from the config files in the run folder, typed summaries gathered
    assert (a / "fl" / "fedbn" / "fl.toml").is_file() and (a / "adapt" / "configs" / "cloud.toml").is_file()
    results = RunResults.read(a / "results.json")
    assert set(results.fl) == {"fedbn"} and results.adapt is not None and results.export.strategy == "fedbn"
    assert set(results.stages) == {"data", "fl", "export", "adapt", "report"}
    exported = {file_sha256(p): p for p in (a / "export").rglob("*.onnx")}
    # non-IID edges: edge i streams client i's domain and runs client i's own FedBN model
    assert results.adapt.config.streams == "domain" and results.export.clients == (0, 1)
    for i, path in enumerate(sorted((a / "adapt" / "edges").glob("edge*.json"))):
        summary = EdgeSummary.read(path)
        assert summary.model.sha256 in exported, f"{path.name} ran a model that is not under export/"
        assert Path(summary.model.path).resolve() == exported[summary.model.sha256].resolve()
        assert Path(summary.model.path).resolve() == (a / "export" / "clients" / str(i) / "edge_batch_stats.onnx").resolve()
    assert len({EdgeSummary.read(p).model.sha256 for p in (a / "adapt" / "edges").glob("edge*.json")}) == 2
    assert "export/clients/0/edge_batch_stats.onnx" in report  # the report names the files the edges ran
    numbers = _numbers(a)
    assert numbers["uploaded"] == numbers["seen"] > 0 and numbers["versions_applied"] > 2  # the cloud really worked
    # same seed → same numbers
    assert numbers == _numbers(runs[1])
    # a stage re-runs from the folder: the report alone
    again = subprocess.run([sys.executable, "-m", "simulations.cli", "run", "tiny", "--out", str(a), "--from",
                            "report"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]


def test_interrupt_stops_every_process(tmp_path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "simulations.cli", "run", "tiny", "--out", str(out),
           "--set", "resources.cache=" + str(tmp_path / "cache")]
    # as from a terminal's foreground: a shell's background job (how CI may run us) has SIGINT
    # ignored, and an ignored SIGINT is inherited, so Python would install no KeyboardInterrupt
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "logs" / "fl-fedbn.log").is_file():
            time.sleep(0.2)
        time.sleep(6)  # inside federated training: Flower + Ray are up
        seen = _descendants(proc.pid)
        assert seen, "the run started no child process"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 130, err[-2000:]
        assert "interrupted" in err
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 20
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(seen), f"left behind: {sorted(_alive(seen))}"


def test_bad_scenario_key_is_a_clear_cli_error(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "simulations.cli", "run", "tiny", "--set", "fl.roundz=2",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown key 'roundz' in [fl]" in out.stderr


@pytest.mark.slow
def test_fl_stage_on_a_running_superlink(tmp_path) -> None:
    """fl.superlink points the same scenario at Flower's deployment engine instead of the simulation."""
    from simulations.flwr_local import local_deployment
    from simulations.pipeline import Pipeline
    from simulations.scenario import load_scenario

    (tmp_path / "deploy").mkdir()
    with local_deployment(2, tmp_path / "deploy", secure=True) as deployment:  # Flower's TLS + SuperNode auth
        scenario = load_scenario("tiny", [f"fl.superlink={deployment.superlink}",
                                          f"fl.superlink_ca={deployment.root_certificates}"])
        Pipeline(scenario, tmp_path / "run").fl()
    results = json.loads((tmp_path / "run" / "fl" / "fedbn" / "results.json").read_text())
    assert results["clients"] == 2 and [h["round"] for h in results["history"]] == [1, 2]
    assert (tmp_path / "run" / "fl" / "fedbn" / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_two_runs_at_once_do_not_collide(tmp_path) -> None:
    """Free ports, separate Ray instances, a shared model cache (file-locked): both finish alike."""
    procs = [subprocess.Popen([sys.executable, "-m", "simulations.cli", "run", "tiny", "--out", str(tmp_path / name),
                               "--set", "resources.cache=" + str(tmp_path / "cache")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in "ab"]
    try:
        errs = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "b")


@pytest.mark.slow
def test_large_scenario_cut_down_runs_on_glyph_shift(tmp_path) -> None:
    """The `large` scenario's path (glyph-shift, long distinct-sample streams) end to end, at toy sizes."""
    run = tmp_path / "large"
    sets = ["data.classes=47", "data.train_per_client=60", "data.val_per_client=20", "data.test_per_client=60",
            "fl.rounds=1", "fl.clients=2", "edge.count=2", 'edge.corruptions=["fog","contrast"]', "edge.samples=50", "edge.passes=2",
            "edge.batch_size=32", "cloud.method=distill_all", "cloud.teacher_epochs=1",
            "resources.cache=" + str(tmp_path / "cache")]
    out = subprocess.run([sys.executable, "-m", "simulations.cli", "run", "large", "--out", str(run),
                          *[x for s in sets for x in ("--set", s)]], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = RunResults.read(run / "results.json")
    assert results.adapt.seen == 2 * 100 and results.adapt.config.data.dataset == "glyph-shift"
    assert set(results.adapt.accuracy.per_corruption) == {"fog", "contrast"}
    assert results.fl["fedbn"].fl_config.classes == 47
    import onnx  # the exported model names the dataset's classes

    meta = {p.key: p.value for p in onnx.load(str(run / "export" / "edge.onnx")).metadata_props}
    assert json.loads(meta["fedshift.class_names"])[10:13] == ["A", "B", "C"]
