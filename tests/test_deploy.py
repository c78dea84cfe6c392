"""The board deployment files (deploy/): this machine cannot run systemd or a container, so the
files are parsed and the commands they run are checked to exist and to parse."""

from __future__ import annotations

import configparser
import json
import shlex
import tomllib
from pathlib import Path

from edge.config import EdgeConfig
from protos.config import load_config
from simulations.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _parses_as_fedshift(argv: list[str]) -> None:
    """``argv`` is a fedshift command line whose subcommand's parser accepts it."""
    assert Path(argv[0]).name in _console_scripts(), argv
    args = build_parser(argv[1]).parse_args(argv[1:])
    assert args.command == argv[1]


def test_systemd_unit_runs_the_edge_with_the_example_config() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(DEPLOY / "fedshift-edge.service")
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    _parses_as_fedshift(argv)
    assert argv[1:3] == ["edge", "--config"] and argv[3] == "/etc/fedshift/edge.toml"
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    assert int(service["TimeoutStopSec"]) > 10  # more than the edge's default flush_timeout_s
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_example_config_is_a_valid_edge_config() -> None:
    cfg = load_config(EdgeConfig, DEPLOY / "edge.toml")
    assert cfg.edge_id and cfg.tls_ca and not cfg.insecure and not cfg.token  # the token stays in edge.env
    assert cfg.node.state_file and cfg.log_format == "json"
    assert cfg.node.flush_timeout_s < 30  # TimeoutStopSec leaves it time to flush


def test_container_file_installs_the_base_and_runs_the_edge() -> None:
    lines = [ln.strip() for ln in (DEPLOY / "Containerfile").read_text().splitlines() if ln.strip()
             and not ln.lstrip().startswith("#")]
    instructions = {ln.split()[0]: ln.split(maxsplit=1)[1] for ln in lines}
    assert instructions["FROM"].startswith("docker.io/library/python:3.")
    installs = [ln for ln in lines if "pip install" in ln]
    assert installs and all("[" not in ln.split("pip install", 1)[1] for ln in installs)  # no extras: no torch
    for ln in lines:
        if ln.startswith("COPY"):
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), src
    entry = json.loads(instructions["ENTRYPOINT"]) + json.loads(instructions["CMD"])
    _parses_as_fedshift(entry)
    health = json.loads(instructions["HEALTHCHECK"].split("CMD", 1)[1])
    _parses_as_fedshift(health)
    assert health[1:3] == ["edge", "status"] and instructions["STOPSIGNAL"] == "SIGTERM"
