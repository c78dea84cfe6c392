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


def test_fraug_settings_are_declared_once_and_mirrored_field_by_field() -> None:
    """Every FRAugSettings field is FLConfig's fraug_<name> (same default and help), and
    FLConfig.fraug rebuilds it from them; a bad value is refused under FLConfig's key."""
    import dataclasses

    from core.fraug_config import FRAugSettings

    ours = {f.name: f for f in dataclasses.fields(FLConfig)}
    for f in dataclasses.fields(FRAugSettings):
        mirror = ours[f"fraug_{f.name}"]
        assert mirror.default == f.default and mirror.metadata["help"] == f.metadata["help"], f.name
    cfg = FLConfig(strategy="fraug", fraug_lambda_t=10.0, fraug_lr_aux=0.025, fraug_momentum_aux=0.3)
    assert cfg.fraug == dataclasses.replace(FRAugSettings(), lambda_t=10.0, lr_aux=0.025, momentum_aux=0.3)
    assert FLConfig.from_run_config({"fraug-g-distance": "mmd"}).fraug.g_distance == "mmd"
    with pytest.raises(ValueError, match=r"fraug_g_distance: 'l1' is not one of mse, mmd"):
        FLConfig(fraug_g_distance="l1")


def test_local_spec_carries_every_training_setting() -> None:
    """The client and the plain-loop benchmark build their LocalSpec from here: nothing retyped."""
    import dataclasses

    cfg = FLConfig(local_epochs=2, local_steps=20, batch_size=64, lr=0.02, momentum=0.9, weight_decay=1e-4,
                   augment="crop-colour")
    spec = cfg.local_spec(proximal_mu=0.01)
    assert dataclasses.asdict(spec) == {"epochs": 2, "steps": 20, "batch_size": 64, "lr": 0.02, "momentum": 0.9,
                                        "weight_decay": 1e-4, "proximal_mu": 0.01, "augment": "crop-colour"}
    assert FLConfig().local_spec().proximal_mu == 0.0
