"""``fedshift adapt``: a cloud process and N forward-only edge processes on loopback, one method.

The launcher prepares what the processes need (the edge model's ONNX files — given by the export
stage, or exported here when run on its own — one corrupted stream per edge as .npz, the teacher
weights), writes each child's resolved role config into ``OUT/configs/`` (``cloud.toml``,
``edge0.toml``, …), starts ``fedshift cloud --config …`` on a free port and ``fedshift edge
--config …`` once per edge, waits for the edges, stops the cloud, and gathers the edges' typed
summaries into ``results.json`` (:class:`AdaptResult`) plus TensorBoard events (one run per edge).
Every process it starts is stopped on the way out, also on errors and Ctrl-C. Any child can be
re-run by hand from its config file (the cloud's port then comes from ``cloud.toml``'s port file,
the edges' server address is in theirs).

Streams: the pooled test splits of the built-in dataset (``split = "val"``: its validation splits,
for picking settings), corrupted at one severity; the corruptions are dealt round-robin to the
edges (edge i gets corruptions i, i+N, …), so every corruption is streamed once whatever N is. Two
no-cloud baselines are measured in-process on the same streams: the running-statistics export
(``no_adapt_accuracy``: source statistics) and the batch-statistics export (``bn_stats_accuracy``:
each batch normalized with its own statistics). How the cloud methods' edges normalize is
``edge_norm`` (:mod:`core.renorm`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.corruptions import CORRUPTIONS
from core.data.builtin import BuiltinData
from core.data.domains import DOMAINS
from core.renorm import EDGE_NORMS
from edge.config import EdgeConfig, NodeConfig
from edge.summary import EdgeSummary
from protos.config import option, section, write_config
from protos.contract import PROTOCOLS
from protos.records import Record
from server.config import CloudConfig
from server.stats import CloudStats

log = logging.getLogger(__name__)

STREAMS = ("pooled", "domain")


@dataclass(frozen=True)
class MethodSpec:
    """How a method maps onto the edge selection and the cloud step: the fields it sets."""

    edge: str  # edge selection method
    cloud: str | None  # cloud learner method; None: no cloud (forward-only baselines)
    norm: str | None = None  # the edge normalization it fixes (None: the run's ``edge_norm``)
    selection: tuple[tuple[str, Any], ...] = ()  # SelectionConfig fields this method sets
    cema: tuple[tuple[str, Any], ...] = ()  # CemaConfig fields this method sets
    about: str = ""


METHODS: dict[str, MethodSpec] = {
    "no_adapt": MethodSpec("none", None, norm="source", about="the exported model as is: source statistics, no cloud"),
    "bn_stats": MethodSpec("none", None, norm="batch", about="edge BN statistics: each batch's own, no cloud"),
    "tent": MethodSpec("all", "tent", cema=(("replay", False),), about="cloud-Tent: upload all, entropy on the student"),
    "distill_all": MethodSpec("all", "distill", about="CEMA's cloud step on every sample"),
    "eata": MethodSpec("eata", "cema", about="EATA selection (H < E0 + redundancy) + CEMA's cloud step"),
    "cema": MethodSpec("cema", "cema", about="CEMA: dynamic E_max, E_min, CEMA's cloud step"),
    "cema_released": MethodSpec("cema_released", "cema", about="the authors' released selection (static E0, "
                                "no E_min, redundancy) + CEMA's cloud step"),
    "oracle": MethodSpec("oracle", "cema", about="benchmarks: upload where edge and teacher disagree + CEMA's cloud step"),
    "random": MethodSpec("random", "cema", about="random uploads at a given rate + CEMA's cloud step"),
    "cema_no_replay": MethodSpec("cema", "cema", cema=(("replay", False),), about="ablation: no replay"),
    "cema_static": MethodSpec("cema", "cema", selection=(("dynamic", False),), about="ablation: E_max = E0"),
    "cema_no_emin": MethodSpec("cema", "cema", selection=(("use_emin", False),), about="ablation: no E_min"),
}


# Fields of the child configs that the launcher fills in itself: a template that sets one would be
# overwritten without a word, so that is refused, naming what to set instead.
LAUNCHER_OWNED: dict[str, str] = {
    "edge.server": "cloud_address (or nothing: a local cloud)", "edge.model": "edge_onnx",
    "edge.source": "corruptions / severity / protocol / samples", "edge.edge_id": "edges",
    "edge.out": "the run folder (--out)", "edge.seed": "seed", "edge.token": "$FEDSHIFT_TOKEN",
    "edge.node.limit": "limit", "edge.selection.method": "method", "edge.selection.seed": "seed",
    "edge.selection.num_classes": "nothing (read from the model)",
    "cloud.host": "nothing (loopback)", "cloud.port": "nothing (a free port)", "cloud.port_file": "nothing",
    "cloud.out_dir": "the run folder (--out)", "cloud.lockstep": "edge.node.sync_timeout_s",
    "cloud.edge_model": "edge_onnx", "cloud.token": "$FEDSHIFT_TOKEN", "cloud.cema.method": "method",
    "cloud.cema.seed": "seed", "cloud.num_classes": "data.classes", "cloud.cema.edge_norm": "edge_norm",
}


def _field(obj: object, path: str) -> object:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def simulation_edge() -> EdgeConfig:
    """The edges' template in a simulation: lockstep with the cloud (2 s bound)."""
    return EdgeConfig(node=NodeConfig(sync_timeout_s=2.0))


@dataclass(frozen=True)
class AdaptConfig:
    """One adaptation run: the launcher's own settings plus the templates of its children.

    ``[edge]`` and ``[cloud]`` are the edge and cloud role configs every child starts from; the
    launcher fills in what it alone knows (addresses, files, ids, per-edge seeds) and what the
    method sets (:data:`METHODS`), and writes the result as each child's config file.
    """

    method: str = option("cema", "the method: " + ", ".join(METHODS), choices=tuple(METHODS))
    edges: int = option(1, "edge processes")
    corruptions: tuple[str, ...] = option(CORRUPTIONS, "corruptions, dealt round-robin to the edges")
    severity: int = option(5, "corruption severity 1..5")
    protocol: str = option("reset", "reset (a new episode per corruption) or continual", choices=PROTOCOLS)
    passes: int = option(1, "passes over the test images per corruption")
    samples: int | None = option(None, "distinct test images per corruption (default: the whole test pool)")
    limit: int | None = option(None, "samples per edge (default: the whole stream)")
    seed: int = option(0, "seed of streams, selection and learners")
    edge_norm: str = option("batch", "how the edges' BN layers normalize: batch (each batch's statistics), running "
                            "(statistics the cloud estimates and sends, the authors'), source (frozen); the "
                            "no-cloud baselines fix theirs (no_adapt: source, bn_stats: batch)", choices=EDGE_NORMS)
    data_seed: int = option(0, "seed of the built-in dataset: the streams are its test images (never trained on)")
    data: BuiltinData = section(BuiltinData, "the built-in dataset the streams (and built-in models) come from")
    streams: str = option("pooled", "pooled: every edge streams the test images of all domains; domain: edge i "
                          "streams client i's own (one domain per edge, as deployed)", choices=STREAMS)
    client_models: str = option("", "a folder of per-client models (<i>/edge.onnx, <i>/edge_batch_stats.onnx, as "
                                "the export stage writes under export/clients): edge i runs client i's, and its "
                                "cloud student starts from it (needs streams = domain)")
    split: str = option("test", "the split the streams are built from: test (reported results) or val (for "
                        "picking settings without touching the test images)", choices=("test", "val"))
    teacher_epochs: int | None = option(None, "the built-in teacher's training epochs (default: its dataset's, "
                                        "digits-shift 30, glyph-shift 20; each setting is cached apart)")
    edge_onnx: str = option("", "the ONNX file the edges run (running statistics); default: exported from "
                            "the student's weights into OUT/models")
    edge_onnx_batch_stats: str = option("", "its batch-statistics variant (methods that re-estimate BN on the "
                                        "edge); default: exported into OUT/models")
    cloud_address: str = option("", "HOST:PORT of a running cloud: no local cloud process is started")
    timeout_s: float = option(1800.0, "longest wait for the edges, seconds")
    edge: EdgeConfig = section(simulation_edge, "the edges' settings", prefix="edge-")
    cloud: CloudConfig = section(CloudConfig, "the cloud's settings (student = the edge model)", prefix="cloud-")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.edges < 1:
            raise ValueError(f"edges must be >= 1, got {self.edges}")
        if self.edges > len(self.corruptions):
            raise ValueError(f"{self.edges} edges for {len(self.corruptions)} corruptions: each edge needs one")
        if unknown := [c for c in self.corruptions if c not in CORRUPTIONS]:
            raise ValueError(f"unknown corruptions {unknown}; valid: {', '.join(CORRUPTIONS)}")
        rate = self.edge.selection.random_rate
        if self.method == "random" and not (rate and 0 < rate <= 1):
            raise ValueError("method 'random' needs edge.selection.random_rate in (0, 1]")
        if self.streams not in STREAMS:
            raise ValueError(f"streams must be one of {', '.join(STREAMS)}, got {self.streams!r}")
        if self.streams == "domain" and self.edges > len(DOMAINS):
            raise ValueError(f"streams = domain: edge i serves client i's domain, and there are {len(DOMAINS)} "
                             f"domains for {self.edges} edges")
        if self.client_models and self.streams != "domain":
            raise ValueError("client_models: edge i runs client i's model on client i's domain; set streams = domain")
        if self.split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {self.split!r}")
        if self.edge_norm not in EDGE_NORMS:
            raise ValueError(f"edge_norm must be one of {', '.join(EDGE_NORMS)}, got {self.edge_norm!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not 1 <= self.severity <= 5:
            raise ValueError(f"severity must be 1..5, got {self.severity}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or not set: the whole stream), got {self.limit}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1 (or not set: the whole test pool), got {self.samples}")
        defaults = {"edge": EdgeConfig(), "cloud": CloudConfig()}
        for path, instead in LAUNCHER_OWNED.items():
            role, rest = path.split(".", 1)
            if _field(getattr(self, role), rest) != _field(defaults[role], rest):
                raise ValueError(f"{path} is set by the launcher for each child; set {instead} instead")
        if self.edge.selection.e0_factor != self.cloud.cema.e0_factor:
            raise ValueError(f"edge.selection.e0_factor {self.edge.selection.e0_factor} and cloud.cema.e0_factor "
                             f"{self.cloud.cema.e0_factor} must agree: both are CEMA's E0 = factor·ln C")

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def image_size(self) -> int:
        return self.cloud.image_size

    @property
    def norm(self) -> str:
        """The edge normalization in force: the method's own, else ``edge_norm``."""
        return self.spec.norm or self.edge_norm

    @property
    def lockstep(self) -> bool:
        return self.spec.cloud is not None and self.edge.node.sync_timeout_s > 0

    def with_random_rate(self, rate: float | None) -> "AdaptConfig":
        return replace(self, edge=replace(self.edge, selection=replace(self.edge.selection, random_rate=rate)))


@dataclass
class Prepared:
    """Files the processes read."""

    plain_onnx: Path  # running-statistics export, for no_adapt_accuracy
    bn_onnx: Path  # batch-statistics export, for bn_stats_accuracy
    edge_weights: Path
    teacher_weights: Path | None
    streams: list[Path] = field(default_factory=list)
    # per edge (client_models): its own (running, batch-statistics) files; empty: all run the shared ones
    own: list[tuple[Path, Path]] = field(default_factory=list)

    def shared_model(self, norm: str) -> Path:
        """The shared file for the edge normalization ``norm`` (the cloud preprocesses uploads with its
        metadata)."""
        return self.bn_onnx if norm == "batch" else self.plain_onnx

    def model_of(self, i: int, norm: str) -> Path:
        """The file edge ``i`` runs under the edge normalization ``norm``."""
        if not self.own:
            return self.shared_model(norm)
        plain, bn = self.own[i]
        return bn if norm == "batch" else plain


def prepare(cfg: AdaptConfig, out: Path) -> Prepared:
    """Resolve models (training the built-ins once if not cached), take or export the ONNX files,
    write the streams."""
    from core.streams import build_stream
    from core.teacher import batch_stats_predictions, builtin_config, eval_split, model_or_builtin
    from protos.contract import StreamSegment, save_stream_npz

    spec, c = cfg.spec, cfg.cloud
    builtin = {"image_size": c.image_size, "data_seed": cfg.data_seed}
    model, edge_weights = model_or_builtin(c.student, c.student_weights or None,
                                           builtin_config("edge", cfg.data, **builtin),
                                           c.cache or None, num_classes=cfg.data.classes, image_size=c.image_size)
    teacher = teacher_weights = None
    if (spec.cloud is not None and spec.cloud != "tent" and not cfg.cloud_address) or spec.edge == "oracle":
        epochs = {} if cfg.teacher_epochs is None else {"epochs": cfg.teacher_epochs}
        teacher_builtin = builtin_config("teacher", cfg.data, **epochs, **builtin)
        teacher, teacher_weights = model_or_builtin(c.teacher, c.teacher_weights or None, teacher_builtin,
                                                    c.cache or None, num_classes=cfg.data.classes,
                                                    image_size=c.image_size)
    shape = (c.in_chans, c.image_size, c.image_size)
    names = cfg.data.class_names()
    plain = _given_or_exported(cfg.edge_onnx, model, out / "models" / "edge.onnx", shape, c.student, False, names)
    bn = _given_or_exported(cfg.edge_onnx_batch_stats, model, out / "models" / "edge_batch_stats.onnx", shape,
                            c.student, True, names)
    dataset = cfg.data.make(cfg.data_seed, c.image_size)
    pooled = eval_split(dataset, cfg.split)
    prepared = Prepared(plain, bn, edge_weights, teacher_weights)
    if cfg.client_models:
        prepared.own = [_client_files(Path(cfg.client_models), i) for i in range(cfg.edges)]
    for i in range(cfg.edges):
        mine = cfg.corruptions[i::cfg.edges]
        test = pooled if cfg.streams == "pooled" else getattr(dataset.clients[i], cfg.split)
        stream = build_stream(test.images, test.labels, corruptions=mine, severities=(cfg.severity,),
                              protocol=cfg.protocol, passes=cfg.passes, samples=cfg.samples,
                              seed=cfg.seed * 1000 + i)
        segments = stream.segments
        if spec.edge == "oracle":  # the teacher's offline predictions, batch by batch as the edge sees them
            segments = [StreamSegment(g.corruption, g.severity, g.images, g.labels,
                                      batch_stats_predictions(teacher, g.images, cfg.edge.batch_size))
                        for g in segments]
        path = out / "streams" / f"edge{i}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_stream_npz(path, segments, stream.protocol)
        prepared.streams.append(path)
        where = "all domains" if cfg.streams == "pooled" else f"domain {dataset.clients[i].domain}"
        log.info("edge%d stream: %s, %s (%d samples)", i, where, ", ".join(mine), len(stream))
    return prepared


def _client_files(folder: Path, i: int) -> tuple[Path, Path]:
    """Client ``i``'s own (running-statistics, batch-statistics) model files under ``folder``."""
    files = (folder / str(i) / "edge.onnx", folder / str(i) / "edge_batch_stats.onnx")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"client_models: {f} does not exist (edge {i} runs client {i}'s model)")
    return files


def _given_or_exported(given: str, model, path: Path, shape, name: str, batch_stats: bool,
                       class_names: Sequence[str]) -> Path:
    """An earlier stage's file when one is given (checked), else this launcher's own export."""
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"edge model {given} does not exist")
        return Path(given)
    from core.export import export_onnx

    export_onnx(model, path, shape, model_name=name, batch_stats=batch_stats, class_names=class_names)
    return path


def edge_config(cfg: AdaptConfig, i: int, prep: Prepared, server: str, out: Path) -> EdgeConfig:
    """Edge ``i``'s resolved config: the template, the method's selection, this edge's files."""
    spec, e = cfg.spec, cfg.edge
    seed = cfg.seed * 1000 + i
    selection = replace(e.selection, method=spec.edge, seed=seed, **dict(spec.selection))
    node = replace(e.node, limit=cfg.limit, sync_timeout_s=e.node.sync_timeout_s if cfg.lockstep else 0.0)
    # a local cloud on loopback: plaintext unless the template asks for TLS (the run's log says so);
    # a running cloud elsewhere: the template's own TLS or --insecure, as for `fedshift edge`
    insecure = e.insecure or (not e.tls_ca and not cfg.cloud_address)
    return replace(e, server=server, model=_abs(prep.model_of(i, cfg.norm)), source=f"npz:{_abs(prep.streams[i])}",
                   edge_id=f"edge{i}", out=_abs(out / "edges" / f"edge{i}.json"), seed=seed, node=node,
                   selection=selection, insecure=insecure)


def cloud_config(cfg: AdaptConfig, prep: Prepared, out: Path, port_file: Path) -> CloudConfig:
    """The cloud's resolved config: the template, the method's cloud step, the prepared files."""
    spec, c = cfg.spec, cfg.cloud
    cema = replace(c.cema, method=str(spec.cloud), seed=cfg.seed, edge_norm=cfg.norm, **dict(spec.cema))
    return replace(c, host="127.0.0.1", port=0, port_file=_abs(port_file), student_weights=_abs(prep.edge_weights),
                   teacher_weights=_abs(prep.teacher_weights) if prep.teacher_weights else "", out_dir=_abs(out),
                   max_workers=max(c.max_workers, 2 * cfg.edges + 4), lockstep=cfg.lockstep,
                   edge_model=_abs(prep.shared_model(cfg.norm)), num_classes=cfg.data.classes, cema=cema,
                   edge_models=tuple(_abs(prep.model_of(i, cfg.norm)) for i in range(len(prep.own))),
                   insecure=c.insecure or not c.tls_cert)  # loopback only (host above): plaintext unless TLS


def _abs(path: str | os.PathLike) -> str:
    """Child config paths are absolute, so a child can be re-run by hand from anywhere."""
    return str(Path(path).resolve())


def run_adapt(cfg: AdaptConfig, out: str | os.PathLike) -> "AdaptResult":
    """Run one method end to end; returns (and writes) ``results.json``."""
    from simulations.processes import ProcessGroup, fedshift_argv, wait_for_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = out / "configs"
    write_config(configs / "adapt.toml", cfg, header="fedshift adapt: this run's resolved settings")
    t0 = time.monotonic()
    prep = prepare(cfg, out)
    t_prepared = time.monotonic()
    spec = cfg.spec
    edge_names = [f"edge{i}" for i in range(cfg.edges)]
    with ProcessGroup(out / "logs") as group:
        server = "none"
        if spec.cloud is not None and cfg.cloud_address:
            server = cfg.cloud_address
            log.info("using the running cloud at %s", server)
        elif spec.cloud is not None:
            port_file = out / "cloud.port"
            port_file.unlink(missing_ok=True)
            path = write_config(configs / "cloud.toml", cloud_config(cfg, prep, out, port_file),
                                header="fedshift cloud --config cloud.toml")
            cloud = group.start("cloud", fedshift_argv("cloud", "--config", str(path)))
            port = wait_for_file(port_file, cloud, timeout=300, what="fedshift cloud")
            server = f"127.0.0.1:{port}"
            log.info("cloud up on %s (pid %d; %s)", server, cloud.pid,
                     "TLS" if cfg.cloud.tls_cert else "plaintext gRPC on loopback: --insecure, as a simulation may be")
        for i, name in enumerate(edge_names):
            path = write_config(configs / f"{name}.toml", edge_config(cfg, i, prep, server, out),
                                header=f"fedshift edge --config {name}.toml")
            group.start(name, fedshift_argv("edge", "--config", str(path)))
        log.info("%d edge process(es) running: %s", cfg.edges, group.pids())
        codes = _wait_with_progress(group, edge_names, out, cfg.timeout_s)
        failed = {n: c for n, c in codes.items() if c != 0}
        if failed:
            tails = "\n".join(f"--- {n} ---\n{group.tail(n)}" for n in failed)
            raise RuntimeError(f"edge process(es) failed: {failed}\n{tails}")
        if spec.cloud is not None and not cfg.cloud_address:
            group.stop("cloud", grace=30)
    summaries = [EdgeSummary.read(out / "edges" / f"{n}.json") for n in edge_names]
    limit = cfg.limit
    batch = cfg.edge.batch_size
    edges = range(cfg.edges)
    no_adapt = forward_only_accuracy([prep.model_of(i, "source") for i in edges], prep.streams, batch, limit)
    bn = forward_only_accuracy([prep.model_of(i, "batch") for i in edges], prep.streams, batch, limit)
    timing = Timing(prepare=t_prepared - t0, adapt=time.monotonic() - t_prepared)
    stats_file = out / "cloud" / "stats.json"
    cloud = CloudStats.read(stats_file) if spec.cloud is not None and not cfg.cloud_address else None
    results = aggregate(cfg, summaries, no_adapt, bn_stats=bn, timing=timing, cloud=cloud)
    write_edge_tensorboard(summaries, out / "edges")
    results.write(out / "results.json")
    log.info("%s: online accuracy %.2f%% (no adaptation %.2f%%), uploaded %.1f%%", cfg.method,
             100 * results.accuracy.overall, 100 * results.no_adapt_accuracy.overall, 100 * results.upload_rate)
    return results


def _wait_with_progress(group, names: Sequence[str], out: Path, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return group.wait(names, timeout=min(15.0, max(0.1, deadline - time.monotonic())))
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise
            for name in names:
                line = group.tail(name, 1)
                if line:
                    log.info("%s: %s", name, line[-160:])


@dataclass(frozen=True)
class Accuracy:
    overall: float = 0.0
    per_corruption: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not all(0.0 <= v <= 1.0 for v in (self.overall, *self.per_corruption.values())):
            raise ValueError(f"accuracies must lie in [0, 1]: {self}")


@dataclass(frozen=True)
class EdgeBrief:
    """One edge's line in the results (the full summary is ``edges/<id>.json``)."""

    edge_id: str | None
    seen: int
    kept: int
    uploaded: int
    accuracy: float | None
    bytes_up: int
    bytes_down: int
    versions_applied: int
    wall_s: float
    sync_timeouts: int
    model_path: str
    model_sha256: str


@dataclass(frozen=True)
class Timing:
    prepare: float = 0.0
    adapt: float = 0.0


@dataclass(frozen=True)
class AdaptResult(Record):
    """``OUT/results.json`` of one adaptation run: the edges' counters summed, accuracies per
    corruption over every edge that streamed it, and the forward-only references."""

    SCHEMA = "fedshift.adapt-result/1"
    DERIVED = ("upload_rate", "edge_norm")

    method: str
    about: str
    config: AdaptConfig
    edges: int
    accuracy: Accuracy
    no_adapt_accuracy: Accuracy
    bn_stats_accuracy: Accuracy | None
    seen: int
    kept: int
    uploaded: int
    upload_failed: int
    uploaded_per_corruption: dict[str, int]
    bytes_up: int
    bytes_down: int
    versions_applied: int
    update_latency_s_mean: float | None
    per_edge: tuple[EdgeBrief, ...]
    timing_s: Timing = field(default_factory=Timing)
    cloud: CloudStats | None = None  # the local cloud's own counters (None: no cloud, or a remote one)

    def __post_init__(self) -> None:
        if len(self.per_edge) != self.edges:
            raise ValueError(f"{len(self.per_edge)} edge lines for {self.edges} edges")
        for key in ("seen", "kept", "uploaded", "bytes_up", "bytes_down", "versions_applied"):
            if sum(getattr(e, key) for e in self.per_edge) != getattr(self, key):
                raise ValueError(f"{key} {getattr(self, key)} is not the sum over the edges")
        if not 0 <= self.uploaded <= self.kept <= self.seen:
            raise ValueError(f"counts: uploaded {self.uploaded}, kept {self.kept}, seen {self.seen}")
        if sum(self.uploaded_per_corruption.values()) != self.uploaded:
            raise ValueError("uploaded_per_corruption does not sum to uploaded")
        if self.cloud is not None:  # what the edges say they delivered is what the cloud received
            received = self.cloud.samples + sum(e.stale_samples for e in self.cloud.edges.values())
            if received != self.uploaded:
                raise ValueError(f"the edges count {self.uploaded} samples acknowledged, the cloud {received} received")

    @property
    def upload_rate(self) -> float:
        return self.uploaded / self.seen if self.seen else 0.0

    @property
    def edge_norm(self) -> str:
        """How the edges normalized: batch, running or source (``config.norm``)."""
        return self.config.norm


def forward_only_accuracy(models: Path | Sequence[Path], streams: Sequence[Path], batch_size: int,
                          limit: int | None = None) -> Accuracy:
    """Accuracy of exported models on the streams, in-process, without any cloud: the running-
    statistics export gives ``no_adapt_accuracy``, the batch-statistics one ``bn_stats_accuracy``
    (batches as the edges form them: ``batch_size`` samples, never across segments; ``limit``
    samples per stream, like the edges' ``limit``). ``models``: one file for every stream, or one
    per stream (each edge's own)."""
    from edge.runtime import EdgeRuntime
    from protos.contract import load_stream_npz

    files = [Path(models)] * len(streams) if isinstance(models, (str, Path)) else [Path(m) for m in models]
    if len(files) != len(streams):
        raise ValueError(f"{len(files)} models for {len(streams)} streams")
    runtimes = {f: EdgeRuntime(f) for f in dict.fromkeys(files)}
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for path, file in zip(streams, files):
        runtime = runtimes[file]
        left = limit if limit else None
        for seg in load_stream_npz(path).segments:
            n = len(seg.images) if left is None else min(left, len(seg.images))
            if n == 0:
                break
            pred = np.concatenate([runtime.predict(seg.images[i:min(i + batch_size, n)]).argmax(1)
                                   for i in range(0, n, batch_size)])
            correct[seg.corruption] = correct.get(seg.corruption, 0) + int((pred == seg.labels[:n]).sum())
            total[seg.corruption] = total.get(seg.corruption, 0) + n
            left = None if left is None else left - n
    return Accuracy(overall=sum(correct.values()) / max(1, sum(total.values())),
                    per_corruption={c: correct[c] / total[c] for c in total})


def aggregate(cfg: AdaptConfig, summaries: Sequence[EdgeSummary], no_adapt: Accuracy, *,
              bn_stats: Accuracy | None = None, timing: Timing = Timing(),
              cloud: CloudStats | None = None) -> AdaptResult:
    """Sum the edges' counters; accuracy per corruption over all edges that streamed it."""
    correct: dict[str, int] = {}
    labelled: dict[str, int] = {}
    uploaded: dict[str, int] = {}
    for s in summaries:
        for name, c in s.per_corruption.items():
            correct[name] = correct.get(name, 0) + c.correct
            labelled[name] = labelled.get(name, 0) + c.labelled
            uploaded[name] = uploaded.get(name, 0) + c.uploaded
    lat = [(s.updates.update_latency_s.count, s.updates.update_latency_s.mean) for s in summaries
           if s.updates.update_latency_s.count and s.updates.update_latency_s.mean is not None]
    n_lat = sum(c for c, _ in lat)
    return AdaptResult(
        method=cfg.method, about=cfg.spec.about, config=cfg, edges=len(summaries),
        accuracy=Accuracy(overall=sum(s.correct for s in summaries) / max(1, sum(s.labelled for s in summaries)),
                          per_corruption={n: correct[n] / max(1, labelled[n]) for n in correct}),
        no_adapt_accuracy=no_adapt, bn_stats_accuracy=bn_stats,
        seen=sum(s.seen for s in summaries), kept=sum(s.kept for s in summaries),
        uploaded=sum(s.uploaded for s in summaries), upload_failed=sum(s.upload_failed for s in summaries),
        uploaded_per_corruption=uploaded, bytes_up=sum(s.bytes_up for s in summaries),
        bytes_down=sum(s.bytes_down for s in summaries),
        versions_applied=sum(s.versions_applied for s in summaries),
        update_latency_s_mean=sum(c * m for c, m in lat) / n_lat if n_lat else None,
        per_edge=tuple(EdgeBrief(s.edge_id, s.seen, s.kept, s.uploaded, s.accuracy, s.bytes_up, s.bytes_down,
                                 s.versions_applied, s.wall_s, s.sync_timeouts, s.model.path, s.model.sha256)
                       for s in summaries),
        timing_s=timing, cloud=cloud,
    )


def write_edge_tensorboard(summaries: Sequence[EdgeSummary], log_dir: Path) -> None:
    """Edge curves from the summaries' timelines (edges are torch-free; the launcher writes them)."""
    from torch.utils.tensorboard import SummaryWriter

    for s in summaries:
        t = s.timeline
        if not len(t):
            continue
        with SummaryWriter(str(log_dir / str(s.edge_id))) as w:
            correct = labelled = uploaded = 0
            for j, seen in enumerate(t.seen):
                n = t.n[j]
                uploaded += t.uploaded[j]
                if t.correct[j] is not None:
                    correct += t.correct[j]
                    labelled += n
                    w.add_scalar("edge/batch_accuracy", t.correct[j] / max(1, n), seen)
                    w.add_scalar("edge/online_accuracy", correct / max(1, labelled), seen)
                w.add_scalar("edge/upload_rate", uploaded / max(1, seen), seen)
                w.add_scalar("edge/kept_in_batch", t.kept[j] / max(1, n), seen)
                if t.mean_entropy[j] is not None:
                    w.add_scalar("edge/mean_entropy", t.mean_entropy[j], seen)
                w.add_scalar("edge/version", t.version[j], seen)
                if t.e_max[j] is not None:
                    w.add_scalar("edge/e_max", t.e_max[j], seen)
            w.add_scalar("edge/bytes_up", s.bytes_up, t.seen[-1])
            w.add_scalar("edge/bytes_down", s.bytes_down, t.seen[-1])
