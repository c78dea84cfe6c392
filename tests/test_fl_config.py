"""The run config: pyproject's [tool.flwr.app.config] and FLConfig agree; bad input is refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from core.fl_config import FLConfig, clients_per_domain

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_run_config_matches_the_dataclass_defaults() -> None:
    flwr = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]
    assert flwr["app"]["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    config = flwr["app"]["config"]
    assert tuple(config) == FLConfig.keys()
    assert FLConfig.from_run_config(config) == FLConfig()
    assert "federations" not in flwr, "flwr 1.42 would rewrite pyproject.toml (see the comment there)"


def test_parsing_coerces_types_and_refuses_unknown_keys_and_bad_values() -> None:
    cfg = FLConfig.from_run_config({"rounds": "3", "lr": 1, "keep-momentum": "false", "strategy": "fedbn"})
    assert cfg.rounds == 3 and cfg.lr == 1.0 and cfg.keep_momentum is False
    assert cfg.to_run_config()["strategy"] == "fedbn"
    with pytest.raises(ValueError, match="unknown key 'roundz'.*valid keys: strategy, seed, rounds"):
        FLConfig.from_run_config({"roundz": 3})
    with pytest.raises(ValueError, match="rounds: expected int, got 'many'"):
        FLConfig.from_run_config({"rounds": "many"})
    with pytest.raises(ValueError, match="strategy"):
        FLConfig.from_run_config({"strategy": "scaffold"})
    with pytest.raises(ValueError, match="multiple of 5"):
        FLConfig.from_run_config({"clients": 7})


def test_every_setting_has_help_text() -> None:
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(FLConfig))


def test_clients_map_onto_domains() -> None:
    assert clients_per_domain(3) == 1 and clients_per_domain(10) == 2
    cfg = FLConfig(clients=10)
    assert [cfg.client_domain(i) for i in (0, 1, 2, 9)] == ["mnist", "mnist", "inverse", "svhn"]
    assert cfg.client_label(1) == "mnist-1"
    assert FLConfig(clients=2).domains() == ("mnist", "inverse")
