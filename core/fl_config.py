"""The federated run's settings: one frozen dataclass parsed once from Flower's flat run config.

Flower run config is flat (``[tool.flwr.app.config]`` in pyproject.toml, ``--run-config`` and
``fedshift fl --set``), with hyphenated keys. :meth:`FLConfig.from_run_config` is the only place
that reads it; everything below takes plain arguments. Keys map to fields by ``-`` → ``_``; an
unknown key or a value of the wrong type is refused with a message naming the key, so a typo in
a run config cannot silently fall back to a default.

Also here, because server and client must agree on them: which state-dict keys a strategy shares
(everything else stays on the client), how ``clients`` maps onto digits-shift domains, and the
deterministic model initialisation both sides start from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # torch stays out of module import: the CLI parses flags without it
    from torch import nn

    from core.models import SplitModel

# Wire format shared by server and client (plain strings: no flwr import here).
GENERATOR_PREFIX = "generator."  # FRAug's generator travels in the model's ArrayRecord under this prefix
PARTITION_KEY = "partition-id"  # every reply's MetricRecord names its client
WEIGHT_KEY = "num-examples"  # Flower's default weighting key
# Clients whose normalization layers stay local also report them under this record; the server
# averages them by sample count for the *deployed* model only (never sent back to clients).
DEPLOY_NORM_RECORD = "deploy-norm"

STRATEGIES: tuple[str, ...] = ("local", "fedavg", "fedprox", "fedbn", "fraug")
_NOISES = ("uniform", "normal")
_G_DISTANCES = ("mse", "mmd")
_FRAUG_BN = ("local", "stats")


@dataclass(frozen=True)
class FLConfig:
    """Every setting of a federated run (defaults = pyproject's ``[tool.flwr.app.config]``)."""

    strategy: str = "fedavg"
    seed: int = 0
    rounds: int = 40
    clients: int = 5
    # data (digits-shift)
    image_size: int = 16
    train_per_client: int = 0  # 0: the whole training split (~215 images)
    # model
    model: str = "digits_cnn"
    model_width: float = 0.25
    # local training (one loop for every strategy)
    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many minibatch steps per round instead of epochs
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.5
    weight_decay: float = 0.0
    keep_momentum: bool = True  # optimizer momentum persists across rounds in Context.state
    proximal_mu: float = 0.01
    threads: int = 1  # torch.set_num_threads per simulated client / server
    # FRAug (METHODS.md)
    fraug_bn: str = "local"  # "local": every norm layer local (FedBN-style); "stats": only running stats
    fraug_noise: str = "uniform"  # z ~ U[0,1) (authors' code) or N(0, I) (paper figure)
    fraug_latent_dim: int = 0  # 0: d/2
    fraug_lambda_max: float = 0.5
    fraug_gamma: float = 0.002
    fraug_warmup_rounds: int = 0
    fraug_lambda_g: float = 1.0
    fraug_g_distance: str = "mse"  # Digits: MSE to the prototypes; others: Gaussian MMD
    fraug_lambda_t: float = 1.0
    fraug_lr_aux: float = 0.05  # generator and RTNet learning rate
    fraug_rtnet_final_bn: bool = True
    fraug_interpolate: bool = False  # û ← ρ·û + (1−ρ)·anchor, ρ = exp(γ(t−T))
    fraug_proto_momentum: float = 0.3
    # outputs
    out_dir: str = ""  # "" → runs/fl-<strategy>-seed<seed> under the working directory
    resume: str = ""  # checkpoint to resume from
    tensorboard: bool = True

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"run config {key.replace('_', '-')!r}: {why}")

        choices = {"strategy": STRATEGIES, "fraug_noise": _NOISES, "fraug_g_distance": _G_DISTANCES,
                   "fraug_bn": _FRAUG_BN}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise bad(key, f"{getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("rounds", "clients", "batch_size", "threads", "image_size"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("seed", "train_per_client", "local_epochs", "local_steps", "fraug_latent_dim",
                    "fraug_warmup_rounds"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.local_epochs == 0 and self.local_steps == 0:
            raise bad("local_steps", "local-epochs and local-steps are both 0: no training")
        if self.lr <= 0 or self.fraug_lr_aux <= 0:
            raise bad("lr", "learning rates must be > 0")
        if not 0.0 <= self.fraug_proto_momentum <= 1.0:
            raise bad("fraug_proto_momentum", "must lie in [0, 1]")
        clients_per_domain(self.clients)  # raises on an impossible client count

    # ---------------------------------------------------------------- parsing
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The run-config keys (hyphenated), in declaration order."""
        return tuple(f.name.replace("_", "-") for f in fields(cls))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FLConfig":
        """Parse Flower's flat run config; unknown keys and wrong types raise ``ValueError``."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise ValueError(f"unknown run config keys: {', '.join(unknown)}; known: {', '.join(by_key)}")
        kwargs = {by_key[k].name: _coerce(k, v, by_key[k].default) for k, v in run_config.items()}
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, Any]:
        """The flat, hyphenated form (what results.json records as the resolved config)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> "FLConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- derived
    @property
    def run_name(self) -> str:
        return f"fl-{self.strategy}-seed{self.seed}"

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


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Coerce a run-config value to the default's type (TOML / CLI give ints for floats, etc.)."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        return str(value)
    raise ValueError(f"run config {key!r}: expected {kind.__name__}, got {value!r}")


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


def build_model(cfg: FLConfig, num_classes: int = 10) -> "SplitModel":
    """The run's model with a deterministic initialisation (same on server and every client).

    The global torch RNG is forked, so building a model never disturbs a caller's random stream.
    """
    import torch

    from core.models import create_model

    kwargs: dict[str, Any] = {"width": cfg.model_width} if cfg.model == "digits_cnn" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return create_model(cfg.model, num_classes, image_size=cfg.image_size, **kwargs)
