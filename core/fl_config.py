"""The federated role's contract: :class:`FLConfig` in (every setting of a run), :class:`FLResult`
out (what results.json holds), both torch-free.

Flower run config is flat (``[tool.flwr.app.config]`` in pyproject.toml, ``--run-config`` and
``fedshift fl --set``), with hyphenated keys. :meth:`FLConfig.from_run_config` reads it through
the project's one codec (:func:`protos.config.from_mapping`); ``fedshift fl --config fl.toml``
reads the same fields from the ``[fl]`` table of a role file (snake_case keys). An unknown key or
a value of the wrong type is refused with a message naming the key, so a typo in a run config
cannot silently fall back to a default.

Also here, because server and client must agree on them: which state-dict keys a strategy shares
(everything else stays on the client), how ``clients`` maps onto digits-shift domains, and the
deterministic model initialisation both sides start from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from core.data.builtin import BuiltinData
from core.fraug_config import FRAugSettings
from protos.config import from_mapping, option, same_as
from protos.records import Record

if TYPE_CHECKING:  # torch stays out of module import: the CLI parses flags without it
    import numpy as np
    from torch import nn

    from core.data.types import FederatedDataset
    from core.models import SplitModel
    from core.training import LocalSpec

# Wire format shared by server and client (plain strings: no flwr import here).
GENERATOR_PREFIX = "generator."  # FRAug's generator travels in the model's ArrayRecord under this prefix
PARTITION_KEY = "partition-id"  # every reply's MetricRecord names its client
WEIGHT_KEY = "num-examples"  # Flower's default weighting key
# Clients whose normalization layers stay local also report them under this record; the server
# averages them by sample count for the *deployed* model only (never sent back to clients).
DEPLOY_NORM_RECORD = "deploy-norm"
# A client's whole Context.state (local layers, momentum, FRAug's RTNet / prototypes / optimizers)
# travels under this record: up on checkpoint rounds (the server checkpoints it), down once in
# the first round after a resume (the client restores it), so a resumed run equals an
# uninterrupted one.
CLIENT_STATE_RECORD = "client-state"
SEND_STATE_KEY = "send-state"  # round config: reply with the client state this round
# A round's evaluate message would carry exactly the arrays the next round's train message
# carries, so the server folds the evaluation into that train message: a train config with this
# key set asks the client to evaluate the received model (with its local layers) *before*
# training, and the reply's MetricRecord carries those metrics under EVALUATED_PREFIX. Only the
# last round has an evaluate message of its own.
EVALUATE_RECEIVED_KEY = "evaluate-received"
EVALUATED_PREFIX = "evaluated."
GLOBAL_ROUND_KEY = "global-round"  # train config: the round counted across a resume (FRAug's schedule uses it)
# A client's MetricRecord: ClientRound's numbers under these keys (client/app.py writes them,
# server/recorder.py reads them), FRAug's under FRAUG_METRIC_PREFIX + its metric name.
TRAIN_METRICS: Mapping[str, str] = MappingProxyType({"train_loss": "train-loss", "train_accuracy": "train-accuracy"})
EVAL_METRICS: Mapping[str, str] = MappingProxyType({"test_loss": "test-loss", "test_accuracy": "test-accuracy",
                                                    "val_loss": "val-loss", "val_accuracy": "val-accuracy"})
FRAUG_METRIC_PREFIX = "fraug-"

STRATEGIES: tuple[str, ...] = ("local", "fedavg", "fedprox", "fedbn", "fraug")
REPORTS: tuple[str, ...] = ("final", "best_val")  # which round's accuracy a table reports (FLResult.report)
AUGMENTS: tuple[str, ...] = ("none", "crop-colour")  # local image augmentation (core/augment.py)
_FRAUG_BN = ("local", "stats")


@dataclass(frozen=True)
class FLConfig:
    """Every setting of a federated run (defaults = pyproject's ``[tool.flwr.app.config]``)."""

    strategy: str = option("fedavg", "how clients share their model: local (nothing shared), fedavg, "
                           "fedprox, fedbn (normalization layers stay local) or fraug", choices=STRATEGIES)
    seed: int = option(0, "random seed of the model initialisation, data order and augmentation")
    rounds: int = option(40, "federated rounds")
    clients: int = option(5, "clients, one digits-shift domain each (<= 5, or a multiple of 5)")
    # data: a built-in feature-shift benchmark, one domain per client
    dataset: str = same_as(BuiltinData, "dataset")
    classes: int = same_as(BuiltinData, "classes")
    image_size: int = option(16, "image side in pixels")
    train_per_client: int = same_as(BuiltinData, "train_per_client")
    val_per_client: int = same_as(BuiltinData, "val_per_client")
    test_per_client: int = same_as(BuiltinData, "test_per_client")
    # model
    model: str = option("digits_cnn", "model: digits_cnn, another built-in model, or timm:<name>")
    model_width: float = option(0.25, "width multiplier of digits_cnn")
    # local training (one loop for every strategy)
    local_epochs: int = option(1, "local epochs per round")
    local_steps: int = option(0, "local minibatch steps per round instead of epochs (0: use local-epochs)")
    batch_size: int = option(32, "local batch size")
    lr: float = option(0.01, "local SGD learning rate")
    momentum: float = option(0.5, "local SGD momentum")
    weight_decay: float = option(0.0, "local SGD weight decay")
    augment: str = option("none", "image augmentation of local batches: none, or crop-colour (random resized "
                          "crop, colour jitter, greyscale: the authors' family)", choices=AUGMENTS)
    keep_momentum: bool = option(True, "keep each client's optimizer momentum from round to round")
    proximal_mu: float = option(0.01, "FedProx proximal term weight")
    threads: int = option(1, "torch threads per simulated client and for the server")
    # FRAug (METHODS.md)
    fraug_bn: str = option("local", "FRAug: local (every normalization layer stays local, as in FedBN) or "
                           "stats (only the running statistics stay local)", choices=_FRAUG_BN)
    fraug_noise: str = same_as(FRAugSettings, "noise")
    fraug_latent_dim: int = same_as(FRAugSettings, "latent_dim")
    fraug_lambda_max: float = same_as(FRAugSettings, "lambda_max")
    fraug_gamma: float = same_as(FRAugSettings, "gamma")
    fraug_warmup_rounds: int = same_as(FRAugSettings, "warmup_rounds")
    fraug_lambda_g: float = same_as(FRAugSettings, "lambda_g")
    fraug_g_distance: str = same_as(FRAugSettings, "g_distance")
    fraug_lambda_t: float = same_as(FRAugSettings, "lambda_t")
    fraug_lr_aux: float = same_as(FRAugSettings, "lr_aux")
    fraug_momentum_aux: float = same_as(FRAugSettings, "momentum_aux")
    fraug_rtnet_final_bn: bool = same_as(FRAugSettings, "rtnet_final_bn")
    fraug_interpolate: bool = same_as(FRAugSettings, "interpolate")
    fraug_proto_momentum: float = same_as(FRAugSettings, "proto_momentum")
    # outputs
    out_dir: str = option("", "output folder (empty: runs/fl-<strategy>-seed<seed>)")
    resume: str = option("", "checkpoint file or run folder to resume from (empty: start fresh)")
    checkpoint_every: int = option(1, "write the checkpoint (global model and every client's state) every this "
                                   "many rounds and at the run's last round")
    stop_at: int = option(0, "end this run after this round, as if stopped there (0: run all rounds); resume "
                          "it later from its checkpoint: a long run in parts, equal to one run")
    tensorboard: bool = option(True, "write TensorBoard event files")
    # fault tolerance (deployment engine: a SuperNode can die)
    min_clients: int = option(0, "clients a round needs (0: all of them); with fewer, a round goes on with the "
                              "clients that answered within round-timeout-s, so a dead client does not stop the run")
    round_timeout_s: float = option(3600.0, "seconds a round waits for its clients' replies (Flower's default)")
    max_update_jump: float = option(0.0, "refuse a client update whose step (L2 distance from the model sent) "
                                    "exceeds this many times the median accepted step of the last rounds, "
                                    "e.g. 10 (0: off; NaN/Inf and mis-shaped updates are always refused)")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"{key}: {why}")

        choices = {"strategy": STRATEGIES, "fraug_bn": _FRAUG_BN, "augment": AUGMENTS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise bad(key, f"{getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("rounds", "clients", "batch_size", "threads", "image_size", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("seed", "train_per_client", "local_epochs", "local_steps", "stop_at"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.local_epochs == 0 and self.local_steps == 0:
            raise bad("local_steps", "local_epochs and local_steps are both 0: no training")
        if self.lr <= 0:
            raise bad("lr", f"must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise bad("momentum", f"must lie in [0, 1), got {self.momentum}")
        try:
            self.fraug  # noqa: B018 - validates FRAug's settings
        except ValueError as exc:
            raise ValueError(f"fraug_{exc}") from None
        if not 0 <= self.min_clients <= self.clients:
            raise bad("min_clients", f"must lie in 0..clients ({self.clients}), got {self.min_clients}")
        if not self.round_timeout_s > 0:
            raise bad("round_timeout_s", f"must be > 0, got {self.round_timeout_s}")
        if not (self.max_update_jump == 0 or self.max_update_jump > 1):
            raise bad("max_update_jump", f"must be 0 (off) or > 1, got {self.max_update_jump}")
        clients_per_domain(self.clients)  # raises on an impossible client count
        self.data  # noqa: B018 - validates the dataset settings

    # ---------------------------------------------------------------- parsing
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The run-config keys (hyphenated), in declaration order."""
        return tuple(f.name.replace("_", "-") for f in fields(cls))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FLConfig":
        """Parse Flower's flat run config; unknown keys and wrong types raise ``ValueError``."""
        try:
            return from_mapping(cls, run_config, kebab=True, text=True)
        except ValueError as exc:
            raise ValueError(f"run config: {exc}") from exc

    def to_run_config(self) -> dict[str, Any]:
        """The flat, hyphenated form (what results.json records as the resolved config)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> "FLConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- derived
    @property
    def run_name(self) -> str:
        return f"fl-{self.strategy}-seed{self.seed}"

    @property
    def data(self) -> BuiltinData:
        """The built-in benchmark the clients train on."""
        return BuiltinData(self.dataset, self.classes, self.train_per_client, self.val_per_client,
                           self.test_per_client)

    def make_data(self) -> "FederatedDataset":
        """The dataset this run's clients train on: the benchmark, over :meth:`domains`, with
        ``clients_per_domain`` clients each, for this seed and image size."""
        return self.data.make(self.seed, self.image_size, domains=self.domains(),
                              clients_per_domain=clients_per_domain(self.clients))

    def local_spec(self, proximal_mu: float = 0.0) -> "LocalSpec":
        """One round of local training as this config sets it (FedProx's ``proximal_mu`` comes with
        the round's message)."""
        from core.training import LocalSpec

        return LocalSpec(epochs=self.local_epochs, steps=self.local_steps, batch_size=self.batch_size, lr=self.lr,
                         momentum=self.momentum, weight_decay=self.weight_decay, proximal_mu=proximal_mu,
                         augment=self.augment)

    @property
    def fraug(self) -> FRAugSettings:
        """FRAug's settings: each ``fraug_<name>`` field is :class:`FRAugSettings`' ``<name>``."""
        return FRAugSettings(**{f.name: getattr(self, f"fraug_{f.name}") for f in fields(FRAugSettings)})

    def domains(self) -> tuple[str, ...]:
        """The digits-shift domains used: the first ``clients`` ones, or all of them."""
        from core.data.domains import DOMAINS

        return DOMAINS[: min(self.clients, len(DOMAINS))]

    def client_domain(self, partition_id: int) -> str:
        """Domain of client ``partition_id`` (make_digits_shift's order: domain-major)."""
        if not 0 <= partition_id < self.clients:
            raise ValueError(f"partition-id {partition_id} out of range for {self.clients} clients")
        return self.domains()[partition_id // clients_per_domain(self.clients)]

    def client_label(self, partition_id: int) -> str:
        """A readable, unique name: the domain, suffixed with the index when domains repeat."""
        domain = self.client_domain(partition_id)
        cpd = clients_per_domain(self.clients)
        return domain if cpd == 1 else f"{domain}-{partition_id % cpd}"


def has_non_finite(values: "np.ndarray") -> bool:
    """Whether a float array holds NaN or Inf: the rule both sides apply to what travels (the server
    refuses such an update, a client does not keep such a state); integer arrays always pass."""
    import numpy as np

    return values.dtype.kind == "f" and not np.isfinite(values).all()


def clients_per_domain(clients: int) -> int:
    """``clients`` ≤ 5: one client per domain (the first ones); else a multiple of the 5 domains."""
    from core.data.domains import DOMAINS

    n = len(DOMAINS)
    if clients <= n:
        return 1
    if clients % n:
        raise ValueError(f"clients must be <= {n} or a multiple of {n} (one domain each), got {clients}")
    return clients // n


# -------------------------------------------------------------------- shared state policy


def local_key_filter(model: "nn.Module", cfg: FLConfig) -> "set[str]":
    """State-dict keys that stay on the client (never sent, never averaged) for ``cfg.strategy``.

    FedAvg/FedProx share everything; FedBN keeps every normalization layer local (selected by
    module type through :func:`core.norm.is_norm_key`); FRAug does the same by default, or only
    the BN running statistics with ``fraug-bn = "stats"`` (the authors' code default); local-only
    shares nothing.
    """
    from core.norm import is_norm_key

    keys = list(model.state_dict())
    if cfg.strategy in ("fedavg", "fedprox"):
        return set()
    if cfg.strategy == "local":
        return set(keys)
    if cfg.strategy == "fraug" and cfg.fraug_bn == "stats":
        stats = ("running_mean", "running_var", "num_batches_tracked")
        return {k for k in keys if is_norm_key(model, k) and k.rsplit(".", 1)[-1] in stats}
    return {k for k in keys if is_norm_key(model, k)}


def shared_keys(model: "nn.Module", cfg: FLConfig) -> list[str]:
    """State-dict keys exchanged with the server, in state-dict order."""
    local = local_key_filter(model, cfg)
    return [k for k in model.state_dict() if k not in local]


def build_model(cfg: FLConfig) -> "SplitModel":
    """The run's model with a deterministic initialisation (same on server and every client).

    The global torch RNG is forked, so building a model never disturbs a caller's random stream.
    """
    import torch

    from core.models import create_model

    kwargs: dict[str, Any] = {"width": cfg.model_width} if cfg.model == "digits_cnn" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return create_model(cfg.model, cfg.classes, image_size=cfg.image_size, **kwargs)


# -------------------------------------------------------------------- the run's result

_TOL = 1e-9  # a mean and the mean of its parts may differ by rounding, no more


def _check_accuracy(where: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: accuracy {value!r} is outside [0, 1]")


def _check_mean(where: str, mean: float | None, parts: Mapping[str, float | None]) -> None:
    """``mean`` equals the mean of ``parts`` when every part and the mean are known."""
    values = list(parts.values())
    if mean is None or not values or any(v is None for v in values):
        return
    expected = math.fsum(values) / len(values)
    if abs(mean - expected) > _TOL:
        raise ValueError(f"{where}: mean {mean!r} is not the mean of the per-client values ({expected!r})")


def _mean_or_none(values: Any) -> float | None:
    values = list(values)
    return math.fsum(values) / len(values) if values and all(v is not None for v in values) else None


@dataclass(frozen=True)
class Report:
    """Per-client and mean accuracies of one run in one report mode (:meth:`FLResult.report`)."""

    mode: str
    per_client_accuracy: dict[str, float | None]
    mean_accuracy: float | None
    per_client_val_accuracy: dict[str, float | None]
    mean_val_accuracy: float | None
    rounds: dict[str, int]  # the round each client's numbers come from


@dataclass(frozen=True)
class ClientRound:
    """One client's numbers in one round (``None``: not reported, or not finite)."""

    partition_id: int
    train_loss: float | None = None
    train_accuracy: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    fraug: dict[str, float | None] | None = None  # FRAug's local losses and label consistency


@dataclass(frozen=True)
class RoundRecord:
    """One federated round: every client's numbers, their means, bytes moved and time taken."""

    round: int
    clients: dict[str, ClientRound] = dataclasses.field(default_factory=dict)  # by client label
    bytes_down: int = 0
    bytes_up: int = 0
    mean_accuracy: float | None = None
    mean_val_accuracy: float | None = None
    round_seconds: float = 0.0
    fraug: dict[str, float | None] | None = None  # FRAug's numbers averaged over clients

    def __post_init__(self) -> None:
        where = f"history round {self.round}"
        if self.round < 1:
            raise ValueError(f"{where}: rounds count from 1")
        if self.bytes_down < 0 or self.bytes_up < 0:
            raise ValueError(f"{where}: negative byte count")
        for name, c in self.clients.items():
            for key in ("train_accuracy", "test_accuracy", "val_accuracy"):
                _check_accuracy(f"{where}, client {name}, {key}", getattr(c, key))
        _check_accuracy(f"{where}, mean_accuracy", self.mean_accuracy)
        _check_accuracy(f"{where}, mean_val_accuracy", self.mean_val_accuracy)
        _check_mean(f"{where}, mean_accuracy", self.mean_accuracy,
                    {n: c.test_accuracy for n, c in self.clients.items()})
        _check_mean(f"{where}, mean_val_accuracy", self.mean_val_accuracy,
                    {n: c.val_accuracy for n, c in self.clients.items()})


@dataclass(frozen=True)
class FLResult(Record):
    """What a federated run reports (``results.json``): the final round's accuracies, the whole
    history and the resolved run config. Final = the last round in ``history``."""

    SCHEMA: ClassVar[str] = "fedshift.fl-result/1"

    strategy: str
    seed: int
    rounds: int  # rounds the run was configured for (``history`` may be shorter if it stopped early)
    clients: int
    per_client_accuracy: dict[str, float | None]  # test accuracy by client label, final round
    mean_accuracy: float | None  # None: no round finished
    per_client_val_accuracy: dict[str, float | None]
    mean_val_accuracy: float | None
    history: tuple[RoundRecord, ...]
    config: dict[str, Any]  # FLConfig.to_run_config(): hyphenated run-config keys
    resumed_from_round: int = 0
    wall_seconds: float = 0.0

    def __post_init__(self) -> None:
        cfg = FLConfig.from_run_config(self.config)  # a valid run config ...
        for key in ("strategy", "seed", "rounds", "clients"):  # ... that describes this run
            if getattr(cfg, key) != getattr(self, key):
                raise ValueError(f"{key} is {getattr(self, key)!r} but config says {getattr(cfg, key)!r}")
        if not 0 <= self.resumed_from_round <= self.rounds:
            raise ValueError(f"resumed_from_round {self.resumed_from_round} outside [0, {self.rounds}]")
        previous = 0
        for entry in self.history:
            if entry.round <= previous:
                raise ValueError(f"history rounds must increase: round {entry.round} after {previous}")
            previous = entry.round
        if previous > self.rounds:
            raise ValueError(f"history reaches round {previous} of {self.rounds}")
        for name, value in self.per_client_accuracy.items():
            _check_accuracy(f"per_client_accuracy[{name!r}]", value)
        for name, value in self.per_client_val_accuracy.items():
            _check_accuracy(f"per_client_val_accuracy[{name!r}]", value)
        _check_accuracy("mean_accuracy", self.mean_accuracy)
        _check_accuracy("mean_val_accuracy", self.mean_val_accuracy)
        _check_mean("mean_accuracy", self.mean_accuracy, self.per_client_accuracy)
        _check_mean("mean_val_accuracy", self.mean_val_accuracy, self.per_client_val_accuracy)
        if self.history:  # the final numbers are the last round's
            last = self.history[-1]
            finals = (("per_client_accuracy", {n: c.test_accuracy for n, c in last.clients.items()}),
                      ("per_client_val_accuracy", {n: c.val_accuracy for n, c in last.clients.items()}),
                      ("mean_accuracy", last.mean_accuracy), ("mean_val_accuracy", last.mean_val_accuracy))
            for key, expected in finals:
                if getattr(self, key) != expected:
                    raise ValueError(f"{key} {getattr(self, key)!r} differs from the last round's ({expected!r})")
        elif self.mean_accuracy is not None or self.per_client_accuracy:
            raise ValueError("accuracies reported but no round in history")

    def report(self, mode: str = "final") -> "Report":
        """The accuracies a table reports: ``final`` -- the last round's; ``best_val`` -- each
        client's test accuracy at the round of its best validation accuracy (the earliest on a tie),
        as the FedBN and FRAug papers report a client's best-validation checkpoint."""
        if mode not in REPORTS:
            raise ValueError(f"report mode must be one of {', '.join(REPORTS)}, got {mode!r}")
        if mode == "final":
            last = self.history[-1].round if self.history else 0
            return Report(mode, dict(self.per_client_accuracy), self.mean_accuracy,
                          dict(self.per_client_val_accuracy), self.mean_val_accuracy,
                          {name: last for name in self.per_client_accuracy})
        test: dict[str, float | None] = {}
        val: dict[str, float | None] = {}
        rounds: dict[str, int] = {}
        for name in self.per_client_accuracy:
            seen = [(h.clients[name].val_accuracy, -h.round, h.clients[name].test_accuracy) for h in self.history
                    if name in h.clients and h.clients[name].val_accuracy is not None]
            if not seen:
                test[name] = val[name] = None
                continue
            best_val, neg_round, at_test = max(seen, key=lambda t: (t[0], t[1]))
            test[name], val[name], rounds[name] = at_test, best_val, -neg_round
        return Report(mode, test, _mean_or_none(test.values()), val, _mean_or_none(val.values()), rounds)

    @property
    def fl_config(self) -> FLConfig:
        """The run's settings, parsed."""
        return FLConfig.from_run_config(self.config)

    @property
    def complete(self) -> bool:
        """Every configured round is in ``history``."""
        return bool(self.history) and self.history[-1].round == self.rounds
