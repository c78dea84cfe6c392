import pytest

from simulations.scenario import (
    SCENARIO_DIR,
    Scenario,
    apply_overrides,
    load_scenario,
    parse_override,
    to_toml,
)


def test_builtin_scenarios_parse() -> None:
    names = {p.stem for p in SCENARIO_DIR.glob("*.toml")}
    assert {"default", "tiny"} <= names
    for name in names:
        assert isinstance(load_scenario(name), Scenario)


@pytest.mark.parametrize("text,expected", [
    ("fl.rounds=10", (["fl", "rounds"], 10)),
    ("cloud.method=eata", (["cloud", "method"], "eata")),
    ('cloud.method="cema"', (["cloud", "method"], "cema")),
    ("fl.strategies=['fedbn','fraug']", (["fl", "strategies"], ["fedbn", "fraug"])),
    ("edge.sync_s = 0.5", (["edge", "sync_s"], 0.5)),
    ("seed=3", (["seed"], 3)),
])
def test_parse_override(text, expected) -> None:
    assert parse_override(text) == expected


def test_overrides_apply_and_type_check(tmp_path) -> None:
    s = load_scenario("tiny", ["fl.rounds=3", "edge.count=2", "seed=7", "fl.strategies=['fedavg','fedbn']",
                               "fl.deploy=fedbn", "fl.lr=1"])
    assert (s.fl.rounds, s.edge.count, s.seed, s.fl.strategies, s.fl.deploy) == (3, 2, 7, ("fedavg", "fedbn"), "fedbn")
    assert s.fl.lr == 1.0 and isinstance(s.fl.lr, float)
    # the resolved TOML round-trips
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(s))
    assert load_scenario(path) == s
    # overrides do not mutate the parsed input
    base = {"fl": {"rounds": 1}}
    apply_overrides(base, ["fl.rounds=2"])
    assert base == {"fl": {"rounds": 1}}


@pytest.mark.parametrize("override,match", [
    ("fl.roundz=3", r"unknown key 'roundz' in \[fl\]; valid keys: strategies, deploy, rounds"),
    ("nope=1", "unknown key 'nope' in the top level"),
    ("fl.rounds=ten", "fl.rounds: expected int, got 'ten'"),
    ("fl.rounds", "expected KEY=VALUE"),
    ("edge.corruptions=['fog','rain']", "unknown \\['rain'\\]"),
    ("fl.deploy=fedprox", "not among fl.strategies"),
    ("fl=3", "fl: expected a table"),
    ("edge.count=0", "edge.count must be"),
])
def test_bad_keys_and_values_are_named(override, match) -> None:
    with pytest.raises(ValueError, match=match):
        load_scenario("tiny", [override])


def test_unknown_scenario_names_and_files() -> None:
    with pytest.raises(FileNotFoundError, match="built-ins are .*default.*tiny"):
        load_scenario("nosuch")
    with pytest.raises(FileNotFoundError, match="scenario file not found"):
        load_scenario("/tmp/definitely-missing.toml")


def test_domain_edges_need_as_many_fl_clients() -> None:
    from simulations.scenario import load_scenario

    with pytest.raises(ValueError, match="at least as many FL clients"):
        load_scenario("default", ["fl.clients=3"])
    assert load_scenario("default", ["fl.clients=3", "edge.streams=pooled"]).edge.streams == "pooled"
