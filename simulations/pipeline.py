"""``fedshift run``: the whole system on one machine, stage by stage, into one run folder.

data → federated training (Flower's simulation engine, one process per strategy) → export of the
deployed strategy's model to ONNX → a cloud process and N edge processes adapting on corrupted
streams over loopback gRPC → report. Each stage writes under ``RUN/<stage>/``; ``stages.json``
records what ran and how long it took, so ``--from STAGE`` re-runs from any stage on the outputs
already in the folder. The folder is one TensorBoard ``--logdir``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from simulations.scenario import Scenario, to_toml

log = logging.getLogger(__name__)

STAGES = ("data", "fl", "export", "adapt", "report")


def fl_run_config(s: Scenario, strategy: str, out: Path) -> dict:
    """The scenario's FL settings as Flower run config (``[tool.flwr.app.config]`` keys)."""
    return {
        "strategy": strategy, "seed": s.seed, "rounds": s.fl.rounds, "clients": s.fl.clients,
        "model": s.fl.model, "image-size": s.data.image_size, "train-per-client": s.data.train_per_client,
        "local-epochs": s.fl.local_epochs, "batch-size": s.fl.batch_size, "lr": s.fl.lr,
        "momentum": s.fl.momentum, "threads": s.resources.threads, "out-dir": str(out.resolve()),
    }


def fl_overrides(s: Scenario, strategy: str, out: Path) -> list[str]:
    """``fedshift fl`` arguments running :func:`fl_run_config` on the simulation engine."""
    config = fl_run_config(s, strategy, out)
    args = ["fl", "--strategy", config.pop("strategy"), "--seed", str(config.pop("seed")),
            "--cpus-per-client", str(s.resources.cpus_per_client)]
    if s.resources.num_cpus:
        args += ["--num-cpus", str(s.resources.num_cpus)]
    for k, v in config.items():
        args += ["--set", f"{k}={v}"]
    return args


class Pipeline:
    """Runs the stages of one scenario into ``out``; every child process is stopped on exit."""

    def __init__(self, scenario: Scenario, out: str | os.PathLike, command: str = "") -> None:
        self.s = scenario
        self.out = Path(out)
        self.command = command or " ".join(shlex.quote(a) for a in ["fedshift", *sys.argv[1:]])
        self.out.mkdir(parents=True, exist_ok=True)
        self._stages_file = self.out / "stages.json"
        self.timings: dict[str, dict] = json.loads(self._stages_file.read_text()) if self._stages_file.is_file() else {}

    # ---------------------------------------------------------------- driver

    def run(self, start: str = "data") -> dict:
        if start not in STAGES:
            raise ValueError(f"unknown stage {start!r}; stages: {', '.join(STAGES)}")
        (self.out / "scenario.toml").write_text(to_toml(self.s))
        (self.out / "command.txt").write_text(self.command + "\n")
        steps: dict[str, Callable[[], None]] = {"data": self.data, "fl": self.fl, "export": self.export,
                                                "adapt": self.adapt, "report": self.report}
        for i, name in enumerate(STAGES[STAGES.index(start):], start=STAGES.index(start) + 1):
            log.info("[%d/%d] %s …", i, len(STAGES), name)
            t0 = time.monotonic()
            steps[name]()
            seconds = time.monotonic() - t0
            self.timings[name] = {"seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            self._stages_file.write_text(json.dumps(self.timings, indent=2))
            log.info("[%d/%d] %s done in %.1f s", i, len(STAGES), name, seconds)
        return self.timings

    # ---------------------------------------------------------------- stages

    def data(self) -> None:
        from core.data import make_digits_shift, save_corruption_preview, save_preview

        ds = make_digits_shift(seed=self.s.seed, image_size=self.s.data.image_size)
        out = self.out / "data"
        save_preview(ds, out / "domains.png")
        save_corruption_preview(ds.clients[2].test.images[:2], out / "corruptions.png", seed=self.s.seed)
        summary = {c.domain: {"train": len(c.train), "val": len(c.val), "test": len(c.test)} for c in ds.clients}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))

    def fl(self) -> None:
        from simulations.processes import ProcessGroup, fedshift_argv

        if self.s.fl.superlink:  # deployment engine: a running SuperLink and its SuperNodes
            from simulations.flwr_local import run_remote

            for strategy in self.s.fl.strategies:
                run_remote(fl_run_config(self.s, strategy, self.out / "fl" / strategy), superlink=self.s.fl.superlink,
                           work_dir=self.out / "logs" / f"flwr-{strategy}")
            return
        with ProcessGroup(self.out / "logs") as group:
            for strategy in self.s.fl.strategies:
                name = f"fl-{strategy}"
                proc = group.start(name, fedshift_argv(*fl_overrides(self.s, strategy, self.out / "fl" / strategy)))
                _follow(group, name, proc, prefix=f"fl {strategy}")
                if proc.returncode != 0:
                    raise RuntimeError(f"federated training ({strategy}) failed:\n{group.tail(name)}")
        for strategy in self.s.fl.strategies:
            r = json.loads((self.out / "fl" / strategy / "results.json").read_text())
            log.info("fl %s: mean accuracy %.2f%%", strategy, 100 * r["mean_accuracy"])

    def export(self) -> None:
        import torch

        from core.export import export_onnx
        from core.models import create_model
        from server.recorder import load_checkpoint

        deploy = self.deployed_strategy()
        ckpt = load_checkpoint(self.out / "fl" / deploy)
        model = create_model(self.s.fl.model, 10, image_size=self.s.data.image_size)
        model.load_state_dict(deployable_state(ckpt))
        out = self.out / "export"
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "edge_weights.pt")
        size = self.s.data.image_size
        info = export_onnx(model.eval(), out / "edge.onnx", (3, size, size), model_name=self.s.fl.model,
                           version=0)
        (out / "deployed.json").write_text(json.dumps({"strategy": deploy, "round": ckpt.round}, indent=2))
        log.info("exported the %s model (round %d) to %s", deploy, ckpt.round, info.path)

    def deployed_strategy(self) -> str:
        """``fl.deploy``, or with ``best_val`` the strategy with the best mean validation accuracy
        (never the test split: the edges' streams are built from it)."""
        if self.s.fl.deploy != "best_val":
            return self.s.fl.deploy
        val = {s: json.loads((self.out / "fl" / s / "results.json").read_text())["mean_val_accuracy"]
               for s in self.s.fl.strategies}
        best = max(val, key=lambda s: (val[s], -self.s.fl.strategies.index(s)))
        log.info("deploying %s (best mean validation accuracy: %s)", best,
                 ", ".join(f"{s} {100 * v:.1f}%" for s, v in val.items()))
        return best

    def adapt(self) -> None:
        from simulations.adapt import AdaptConfig, run_adapt

        s = self.s
        cfg = AdaptConfig(
            method=s.cloud.method, edges=s.edge.count, corruptions=s.edge.corruptions, severity=s.edge.severity,
            protocol=s.edge.protocol, passes=s.edge.passes, limit=s.edge.limit or None,
            batch_size=s.edge.batch_size, seed=s.seed, data_seed=s.seed, image_size=s.data.image_size, sync_s=s.edge.sync_s, edge_model=s.fl.model,
            edge_weights=str(self.out / "export" / "edge_weights.pt"), teacher=s.cloud.teacher,
            teacher_weights=s.cloud.teacher_weights or None, teacher_epochs=s.cloud.teacher_epochs,
            cache=s.resources.cache or None, threads=s.resources.threads, device=s.cloud.device,
            cloud_address=s.cloud.address)
        run_adapt(cfg, self.out / "adapt")

    def report(self) -> None:
        from simulations.report import write_report

        path = write_report(self.out)
        log.info("report: %s", path)


def deployable_state(ckpt) -> dict:
    """The model the edges run: the global weights, with normalization layers that stayed local
    (FedBN / FRAug / local-only) replaced by the sample-weighted average of the clients' own,
    which the server records for deployment (``Checkpoint.deploy_norm``)."""
    state = dict(ckpt.model)
    deploy_norm = getattr(ckpt, "deploy_norm", None)
    if deploy_norm:
        state.update(deploy_norm)
    return state


def _follow(group, name: str, proc, prefix: str, every: float = 5.0) -> None:
    """Wait for a child, echoing its newest log line at most every ``every`` seconds (progress)."""
    last, shown = "", 0.0
    while proc.poll() is None:
        time.sleep(0.5)
        line = group.tail(name, 1)
        if line and line != last and time.monotonic() - shown >= every:
            log.info("%s: %s", prefix, line.split(": ", 1)[-1][-150:])
            last, shown = line, time.monotonic()

