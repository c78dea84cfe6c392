"""Scenarios: one TOML file describes a whole run; parsed once into frozen dataclasses.

Every key can be overridden from the command line (``--set fl.rounds=10``); a key that does not
exist is refused with an error naming it and the keys that do. Values are TOML literals
(``fl.strategies=["fedbn","fraug"]``, ``cloud.method="eata"``); a bare word is taken as a string.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from core.cema import CemaConfig
from core.corruptions import CORRUPTIONS
from core.data.builtin import BuiltinData
from core.fl_config import FLConfig
from edge.config import EdgeConfig, NodeConfig
from protos.config import from_mapping, load_toml, option, same_as, tomllib
from server.config import CloudConfig
from simulations.adapt import AdaptConfig
from simulations.fl_role import SimulationResources
from protos.config import to_toml as config_toml

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


@dataclass(frozen=True)
class DataSpec:
    dataset: str = same_as(BuiltinData, "dataset")
    classes: int = same_as(BuiltinData, "classes")
    image_size: int = same_as(FLConfig, "image_size", 32)
    train_per_client: int = same_as(BuiltinData, "train_per_client")
    val_per_client: int = same_as(BuiltinData, "val_per_client")
    test_per_client: int = same_as(BuiltinData, "test_per_client")

    def __post_init__(self) -> None:
        self.builtin  # noqa: B018 - validates

    @property
    def builtin(self) -> BuiltinData:
        return BuiltinData(self.dataset, self.classes, self.train_per_client, self.val_per_client,
                           self.test_per_client)


@dataclass(frozen=True)
class FLSpec:
    strategies: tuple[str, ...] = option(("fraug", "fedbn"), "strategies to train, one Flower run each")
    deploy: str = option("best_val", "whose trained model the edges run: a strategy, or best_val (the best mean "
                         "validation accuracy)")
    rounds: int = same_as(FLConfig, "rounds", 20)
    clients: int = same_as(FLConfig, "clients")
    model: str = option("edge_cnn", "registry model: trained by FL, run by the edges, the cloud's student")
    local_epochs: int = same_as(FLConfig, "local_epochs")
    batch_size: int = same_as(FLConfig, "batch_size")
    lr: float = same_as(FLConfig, "lr", 0.05)
    momentum: float = same_as(FLConfig, "momentum", 0.9)
    superlink_ca: str = option("", "the CA certificate (PEM) that signed the SuperLink's TLS certificate: connect "
                               "to fl.superlink over TLS (empty: plaintext, --insecure)")
    superlink: str = option("", "deployment engine instead of the simulation: a running SuperLink's Control API "
                            "address (HOST:PORT) whose SuperNodes serve the clients; its ServerApp must see "
                            "this run folder")


@dataclass(frozen=True)
class EdgeSpec:
    count: int = option(5, "edge processes (each streams its share of the corruptions)")
    corruptions: tuple[str, ...] = same_as(AdaptConfig, "corruptions")
    severity: int = same_as(AdaptConfig, "severity")
    protocol: str = same_as(AdaptConfig, "protocol")
    passes: int = same_as(AdaptConfig, "passes")
    samples: int | None = same_as(AdaptConfig, "samples")
    limit: int | None = same_as(AdaptConfig, "limit")
    batch_size: int = same_as(EdgeConfig, "batch_size")
    norm: str = same_as(AdaptConfig, "edge_norm")
    streams: str = same_as(AdaptConfig, "streams", "domain")
    sync_s: float = same_as(NodeConfig, "sync_timeout_s", 2.0)


@dataclass(frozen=True)
class CloudSpec:
    method: str = same_as(AdaptConfig, "method")
    teacher: str = same_as(CloudConfig, "teacher")
    teacher_weights: str = same_as(CloudConfig, "teacher_weights")
    teacher_epochs: int | None = same_as(AdaptConfig, "teacher_epochs")
    device: str = same_as(CloudConfig, "device")
    address: str = same_as(AdaptConfig, "cloud_address")
    lr: float = option(CemaConfig().student_lr, "the cloud student's learning rate; the teacher's is a tenth "
                       "(CEMA's 10:1)")


@dataclass(frozen=True)
class ResourceSpec:
    num_cpus: int = same_as(SimulationResources, "num_cpus")
    cpus_per_client: int = same_as(SimulationResources, "cpus_per_client")
    threads: int = option(1, "torch / ONNX Runtime threads per process")
    cache: str = same_as(CloudConfig, "cache")


@dataclass(frozen=True)
class Scenario:
    name: str = "default"
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    fl: FLSpec = field(default_factory=FLSpec)
    edge: EdgeSpec = field(default_factory=EdgeSpec)
    cloud: CloudSpec = field(default_factory=CloudSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)

    def __post_init__(self) -> None:
        if self.fl.deploy != "best_val" and self.fl.deploy not in self.fl.strategies:
            raise ValueError(f"fl.deploy = {self.fl.deploy!r} is not among fl.strategies {list(self.fl.strategies)}")
        if unknown := [c for c in self.edge.corruptions if c not in CORRUPTIONS]:
            raise ValueError(f"edge.corruptions: unknown {unknown}; valid: {', '.join(CORRUPTIONS)}")
        if self.edge.count < 1 or self.edge.count > len(self.edge.corruptions):
            raise ValueError(f"edge.count must be 1..{len(self.edge.corruptions)} (one corruption per edge at least)")
        if self.edge.streams == "domain" and self.edge.count > self.fl.clients:
            raise ValueError(f"edge.streams = domain: edge i serves client i's domain, and {self.edge.count} edges "
                             f"need at least as many FL clients (fl.clients = {self.fl.clients})")
        if self.fl.deploy == "local" or (self.fl.deploy == "best_val" and "local" in self.fl.strategies):
            raise ValueError("local-only training has no global model to deploy: set fl.deploy to another strategy")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"fl.rounds=10"`` → (["fl", "rounds"], 10); values are TOML literals or bare strings."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected KEY=VALUE (e.g. fl.rounds=10)")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key or any(not p for p in key.split(".")):
        raise ValueError(f"override {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part} is not a table")
        node[path[-1]] = value
    return out


def resolve_path(name_or_path: str | Path | None) -> Path:
    """A scenario name (``default``, ``tiny``) or a path to a TOML file."""
    if name_or_path is None:
        name_or_path = "default"
    path = Path(name_or_path)
    if path.suffix != ".toml":
        candidate = SCENARIO_DIR / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
        raise FileNotFoundError(f"no scenario {name_or_path!r}: built-ins are {known}; or give a .toml path")
    if not path.is_file():
        raise FileNotFoundError(f"scenario file not found: {path}")
    return path


def load_scenario(name_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Scenario:
    path = resolve_path(name_or_path)
    data = load_toml(path)
    try:
        return from_mapping(Scenario, apply_overrides(data, overrides))
    except ValueError as exc:
        raise ValueError(f"scenario {path.name}: {exc}") from exc


def to_toml(scenario: Scenario) -> str:
    """The resolved scenario as TOML (written into every run folder)."""
    return config_toml(scenario, header=f"fedshift run: scenario {scenario.name!r}, resolved")
