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
from typing import TYPE_CHECKING, Callable, Sequence

from simulations.scenario import Scenario, to_toml

if TYPE_CHECKING:  # heavy stacks are imported by the stages that use them
    from simulations.adapt import AdaptConfig
    from simulations.fl_role import FLRun
    from simulations.results import StageTime

log = logging.getLogger(__name__)

STAGES = ("data", "fl", "export", "adapt", "report")


def fl_run(s: Scenario, strategy: str, out: Path) -> "FLRun":
    """The FL stage's settings for one strategy (written as ``out/fl.toml`` for its child)."""
    from core.fl_config import FLConfig
    from simulations.fl_role import FLRun, SimulationResources

    d = s.data
    fl = FLConfig(strategy=strategy, seed=s.seed, rounds=s.fl.rounds, clients=s.fl.clients, model=s.fl.model,
                  dataset=d.dataset, classes=d.classes, image_size=d.image_size, train_per_client=d.train_per_client,
                  val_per_client=d.val_per_client, test_per_client=d.test_per_client,
                  local_epochs=s.fl.local_epochs, batch_size=s.fl.batch_size, lr=s.fl.lr, momentum=s.fl.momentum,
                  threads=s.resources.threads, out_dir=str(out.resolve()))
    return FLRun(fl=fl, simulation=SimulationResources(num_cpus=s.resources.num_cpus,
                                                       cpus_per_client=s.resources.cpus_per_client))


class Pipeline:
    """Runs the stages of one scenario into ``out``; every child process is stopped on exit."""

    def __init__(self, scenario: Scenario, out: str | os.PathLike, command: str = "") -> None:
        self.s = scenario
        self.out = Path(out)
        self.command = command or " ".join(shlex.quote(a) for a in ["fedshift", *sys.argv[1:]])
        self.out.mkdir(parents=True, exist_ok=True)
        from simulations.results import read_stage_times

        self.timings: dict[str, StageTime] = read_stage_times(self.out)

    # ---------------------------------------------------------------- driver

    def run(self, start: str = "data") -> dict[str, StageTime]:
        from simulations.results import StageTime, write_stage_times

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
            self.timings[name] = StageTime(round(seconds, 2), time.strftime("%Y-%m-%d %H:%M:%S"))
            write_stage_times(self.out, self.timings)
            self.write_results()
            log.info("[%d/%d] %s done in %.1f s", i, len(STAGES), name, seconds)
        return self.timings

    def write_results(self) -> Path:
        """``RUN/results.json``: every finished stage's summary, gathered."""
        from simulations.results import gather

        return gather(self.out, self.s.name, self.s.seed, self.timings).write(self.out / "results.json")

    # ---------------------------------------------------------------- stages

    def data(self) -> None:
        from core.data import save_corruption_preview, save_preview

        ds = self.s.data.builtin.make(self.s.seed, self.s.data.image_size)
        out = self.out / "data"
        save_preview(ds, out / "domains.png")
        save_corruption_preview(ds.clients[2].test.images[:2], out / "corruptions.png", seed=self.s.seed)
        summary = {c.domain: {"train": len(c.train), "val": len(c.val), "test": len(c.test)} for c in ds.clients}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))

    def fl(self) -> None:
        from core.fl_config import FLResult
        from simulations.processes import ProcessGroup, fedshift_argv

        if self.s.fl.superlink:  # deployment engine: a running SuperLink and its SuperNodes
            from simulations.flwr_local import run_remote

            for strategy in self.s.fl.strategies:
                run = fl_run(self.s, strategy, self.out / "fl" / strategy)
                run.write(self.out / "fl" / strategy / "fl.toml")
                if not self.s.fl.superlink_ca:
                    log.warning("fl.superlink %s: plaintext (no fl.superlink_ca given)", self.s.fl.superlink)
                run_remote(run.fl.to_run_config(), superlink=self.s.fl.superlink,
                           work_dir=self.out / "logs" / f"flwr-{strategy}",
                           root_certificates=str(Path(self.s.fl.superlink_ca).resolve()) if self.s.fl.superlink_ca
                           else "")
            return
        with ProcessGroup(self.out / "logs") as group:
            for strategy in self.s.fl.strategies:
                name = f"fl-{strategy}"
                path = self.out / "fl" / strategy / "fl.toml"
                fl_run(self.s, strategy, path.parent).write(path)
                proc = group.start(name, fedshift_argv("fl", "--config", str(path)))
                _follow(group, name, proc, prefix=f"fl {strategy}")
                if proc.returncode != 0:
                    raise RuntimeError(f"federated training ({strategy}) failed:\n{group.tail(name)}")
        for strategy in self.s.fl.strategies:
            r = FLResult.read(self.out / "fl" / strategy / "results.json")
            mean = "n/a" if r.mean_accuracy is None else f"{100 * r.mean_accuracy:.2f}%"
            log.info("fl %s: mean accuracy %s", strategy, mean)

    def export(self) -> None:
        """Every model file the edges may run, written once: ``edge.onnx`` (running statistics: the
        ``running`` and ``source`` edge normalizations, and no adaptation) and
        ``edge_batch_stats.onnx`` (each batch's statistics: ``batch``, and the edge-BN-statistics
        baseline); plus the weights the cloud's student starts from. That is the model with the
        clients' local normalization layers averaged; when the strategy kept them local (FedBN,
        FRAug), each client's own model is written too, under ``clients/<id>/``, for the edge that
        serves that client's domain."""
        import torch

        from core.export import export_onnx
        from core.models import create_model
        from protos.contract import file_sha256
        from server.recorder import load_checkpoint
        from simulations.results import ExportedFile, ExportSummary

        deploy = self.deployed_strategy()
        ckpt = load_checkpoint(self.out / "fl" / deploy)
        out = self.out / "export"
        out.mkdir(parents=True, exist_ok=True)
        models = {"": deployable_state(ckpt)}
        # local-only keeps every layer local and reports only its norm layers: no per-client model
        clients = sorted((ckpt.client_norm or {}).items()) if deploy in ("fedbn", "fraug") else []
        for pid, norm in clients:
            models[f"clients/{pid}/"] = {**ckpt.model, **norm}
        files: dict[str, ExportedFile] = {}
        size = self.s.data.image_size
        for prefix, state in models.items():
            model = create_model(self.s.fl.model, self.s.data.classes, image_size=size)
            model.load_state_dict(state)
            (out / prefix).mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out / prefix / "edge_weights.pt")
            for name, batch_stats in (("edge.onnx", False), ("edge_batch_stats.onnx", True)):
                export_onnx(model.eval(), out / prefix / name, (3, size, size), model_name=self.s.fl.model,
                            version=0, batch_stats=batch_stats, class_names=self.s.data.builtin.class_names())
                files[prefix + name] = ExportedFile(file_sha256(out / prefix / name), batch_stats)
            log.info("exported the %s model (round %d) to %s", deploy, ckpt.round, out / prefix)
        ExportSummary(strategy=deploy, round=ckpt.round, weights="edge_weights.pt", files=files,
                      clients=tuple(pid for pid, _ in clients)).write(out / "deployed.json")

    def deployed_strategy(self) -> str:
        """``fl.deploy``, or with ``best_val`` the strategy with the best mean validation accuracy
        (never the test split: the edges' streams are built from it)."""
        if self.s.fl.deploy != "best_val":
            return self.s.fl.deploy
        from core.fl_config import FLResult

        val = {s: FLResult.read(self.out / "fl" / s / "results.json").mean_val_accuracy for s in self.s.fl.strategies}
        if missing := [s for s, v in val.items() if v is None]:
            raise ValueError(f"no validation accuracy for {missing}: cannot pick the model to deploy")
        best = max(val, key=lambda s: (val[s], -self.s.fl.strategies.index(s)))
        log.info("deploying %s (best mean validation accuracy: %s)", best,
                 ", ".join(f"{s} {100 * v:.1f}%" for s, v in val.items()))
        return best

    def adapt(self) -> None:
        from simulations.adapt import run_adapt

        from simulations.results import ExportSummary

        export = self.out / "export"
        exported = ExportSummary.read(export / "deployed.json")
        exported.verify(export)  # run what the export stage wrote, unchanged
        if "edge_batch_stats.onnx" not in exported.files:
            raise ValueError("the export stage did not write edge_batch_stats.onnx (an older run): "
                             "re-run from the export stage (--from export)")
        run_adapt(adapt_config(self.s, export, exported.clients), self.out / "adapt")

    def report(self) -> None:
        from simulations.report import write_report

        path = write_report(self.out)
        log.info("report: %s", path)


def adapt_config(s: Scenario, export: Path, clients: Sequence[int] = ()) -> "AdaptConfig":
    """The adapt stage's settings: the scenario's, with the export stage's files as inputs. With
    per-domain streams and per-client models exported (FedBN, FRAug), edge i runs client i's."""
    from core.cema import CemaConfig
    from edge.config import EdgeConfig, NodeConfig
    from server.config import CloudConfig
    from simulations.adapt import AdaptConfig

    batch_stats = export / "edge_batch_stats.onnx"
    return AdaptConfig(
        method=s.cloud.method, edges=s.edge.count, corruptions=s.edge.corruptions, severity=s.edge.severity,
        protocol=s.edge.protocol, passes=s.edge.passes, samples=s.edge.samples, limit=s.edge.limit, seed=s.seed,
        edge_norm=s.edge.norm, streams=s.edge.streams,
        client_models=str(export / "clients") if s.edge.streams == "domain" and clients else "",
        data_seed=s.seed, data=s.data.builtin,
        teacher_epochs=s.cloud.teacher_epochs, edge_onnx=str(export / "edge.onnx"),
        edge_onnx_batch_stats=str(batch_stats) if batch_stats.is_file() else "", cloud_address=s.cloud.address,
        edge=EdgeConfig(batch_size=s.edge.batch_size, threads=s.resources.threads,
                        node=NodeConfig(sync_timeout_s=s.edge.sync_s)),
        cloud=CloudConfig(student=s.fl.model, student_weights=str(export / "edge_weights.pt"),
                          teacher=s.cloud.teacher, teacher_weights=s.cloud.teacher_weights,
                          image_size=s.data.image_size, cache=s.resources.cache, threads=s.resources.threads,
                          device=s.cloud.device, cema=CemaConfig(student_lr=s.cloud.lr, teacher_lr=s.cloud.lr / 10)))


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

