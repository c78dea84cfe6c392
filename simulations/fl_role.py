"""The ``fedshift fl`` role config: one frozen dataclass, read from ``fl.toml`` or the command line.

:class:`FLRun` is what one ``fedshift fl`` process needs: the federated run's settings
(:class:`~core.fl_config.FLConfig`, the ``[fl]`` table) and the simulation's CPU budget
(``[simulation]``). A parent process (``fedshift fl compare``, ``fedshift run``) hands a child its
settings as a file::

    FLRun(fl=FLConfig(strategy="fedbn", out_dir=str(run_dir))).write(run_dir / "fl.toml")
    # then: fedshift fl --config run_dir/fl.toml

and reads its summary back with ``FLResult.read(run_dir / "results.json")``. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.fl_config import FLConfig
from protos.config import option, section, to_toml, write_config

ROLE_FILE = "fl.toml"  # the resolved role config, written beside results.json
HEADER = "fedshift fl settings: fedshift fl --config FILE (flags override the file)"


@dataclass(frozen=True)
class SimulationResources:
    """CPUs for Flower's simulation engine (Ray)."""

    num_cpus: int = option(0, "CPUs the simulation may use (0: one per client, at most the machine's cores)")
    cpus_per_client: int = option(1, "CPUs per simulated client (1: as many clients train in parallel as "
                                  "there are CPUs)")

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus: must be >= 0, got {self.num_cpus}")
        if self.cpus_per_client < 1:
            raise ValueError(f"cpus_per_client: must be >= 1, got {self.cpus_per_client}")
        if self.num_cpus and self.num_cpus < self.cpus_per_client:
            raise ValueError(f"num_cpus ({self.num_cpus}) is less than cpus_per_client ({self.cpus_per_client})")


@dataclass(frozen=True)
class FLRun:
    """One ``fedshift fl`` process: what to train and with how many CPUs."""

    fl: FLConfig = section(FLConfig, "the federated run")
    simulation: SimulationResources = section(SimulationResources, "the simulation engine's resources")

    def to_toml(self) -> str:
        """The file ``fedshift fl --config`` reads (what ``--print-config`` prints)."""
        return to_toml(self, header=HEADER)

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_toml` to ``path`` (atomically)."""
        return write_config(path, self, HEADER)
