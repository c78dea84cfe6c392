"""FRAug's settings, the one place their names, defaults, help and checks live (torch-free).

:class:`core.fl_config.FLConfig` mirrors each field as ``fraug_<name>`` (run config
``fraug-<name>``) through :func:`protos.config.same_as` and rebuilds this object with
:meth:`FLConfig.fraug`; :class:`core.fraug.FRAugHook` takes it. Defaults are the authors'
Digits code (METHODS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from protos.config import option

NOISES = ("uniform", "normal")
G_DISTANCES = ("mse", "mmd")


@dataclass(frozen=True)
class FRAugSettings:
    """FRAug's knobs (the generator's and RTNet's optimizer settings are their own, never the model's)."""

    noise: str = option("uniform", "FRAug generator noise: uniform (z ~ U[0,1), the code) or normal (N(0, I), "
                        "the paper's figure)", choices=NOISES)
    latent_dim: int = option(0, "FRAug generator noise size (0: half the embedding size)")
    lambda_max: float = option(0.5, "FRAug: largest weight of the synthetic-embedding loss")
    gamma: float = option(0.002, "FRAug: ramp-up rate of that weight")
    warmup_rounds: int = option(0, "FRAug: rounds of plain training before augmenting")
    lambda_g: float = option(1.0, "FRAug: weight of the generator's distance loss")
    g_distance: str = option("mse", "FRAug generator distance: mse (to the class prototypes, Digits) or mmd "
                             "(Gaussian MMD to the batch embeddings)", choices=G_DISTANCES)
    lambda_t: float = option(1.0, "FRAug: weight of the RTNet loss")
    lr_aux: float = option(0.05, "FRAug: learning rate of the generator and the RTNet (never the model's)")
    momentum_aux: float = option(0.5, "FRAug: SGD momentum of the generator and the RTNet (never the model's; "
                                 "the authors use 0.5 for all three optimizers)")
    rtnet_final_bn: bool = option(True, "FRAug: end the RTNet with a batch-norm layer")
    interpolate: bool = option(False, "FRAug: blend synthetic embeddings towards their anchor (weight "
                               "exp(gamma (t - T)))")
    proto_momentum: float = option(0.3, "FRAug: momentum of the class-prototype update, in [0, 1]")

    def __post_init__(self) -> None:
        """Errors start with the field's name (FLConfig puts its ``fraug_`` prefix before it)."""
        if self.noise not in NOISES:
            raise ValueError(f"noise: {self.noise!r} is not one of {', '.join(NOISES)}")
        if self.g_distance not in G_DISTANCES:
            raise ValueError(f"g_distance: {self.g_distance!r} is not one of {', '.join(G_DISTANCES)}")
        for key in ("latent_dim", "warmup_rounds"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.lr_aux <= 0:
            raise ValueError(f"lr_aux: must be > 0, got {self.lr_aux}")
        if not 0.0 <= self.momentum_aux < 1.0:
            raise ValueError(f"momentum_aux: must lie in [0, 1), got {self.momentum_aux}")
        if not 0.0 <= self.proto_momentum <= 1.0:
            raise ValueError(f"proto_momentum: must lie in [0, 1], got {self.proto_momentum}")
