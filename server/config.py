"""The cloud role's settings: one frozen dataclass for ``fedshift cloud`` and :class:`CloudService`.

Read from ``cloud.toml`` (``--config``) and generated flags (``protos.config``); the CEMA step's
own constants are the ``[cema]`` section (:class:`core.cema.CemaConfig`). ``$FEDSHIFT_TOKEN`` is
read when ``token`` is empty, so a secret need not sit in the file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from core.cema import CemaConfig
from protos.codec import MAX_MESSAGE_BYTES
from protos.config import option, section
from protos.contract import TOKEN_ENV



@dataclass(frozen=True)
class CloudConfig:
    """Everything one cloud process needs: where to listen, which models, how to learn."""

    host: str = option("127.0.0.1", "address to bind (default: loopback only)")
    port: int = option(50051, "port to bind; 0 picks a free one")
    port_file: str = option("", "write the bound port to this file (useful with port 0)")
    token: str = option("", f"one auth token every edge must send (default: ${TOKEN_ENV}, else none); "
                        "per-edge credentials are better: --credentials")
    credentials: str = option("", "per-edge credentials file (`fedshift creds add`): edge id -> salted token "
                              "hash or certificate name; re-read when it changes")
    tls_cert: str = option("", "serve TLS with this certificate (PEM; `fedshift certs` makes test ones)")
    tls_key: str = option("", "the TLS certificate's private key (PEM)")
    tls_client_ca: str = option("", "mutual TLS: edges must present a certificate signed by this CA (PEM)")
    insecure: bool = option(False, "serve plaintext gRPC (no TLS): only on a trusted network or loopback")
    shared: bool = option(False, "one student for all edges (default: one per edge)")
    device: str = option("cpu", "torch device of the learners: cpu, cuda, cuda:1, …")
    out_dir: str = option("", "output folder: TensorBoard, config and stats under OUT/cloud", flag="out")
    # the models
    student: str = option("edge_cnn", "the edge model's registry name (or timm:<name>)")
    student_weights: str = option("", "the edge model's weights (default for edge_cnn: the built-in edge model)")
    teacher: str = option("teacher_resnet", "teacher registry name (or timm:<name>)")
    teacher_weights: str = option("", "teacher weights (default for teacher_resnet: the built-in robust teacher)")
    num_classes: int = option(10, "classes of student and teacher")
    image_size: int = option(32, "input height = width")
    in_chans: int = option(3, "input channels")
    cache: str = option("", "cache of the built-in models (default: $FEDSHIFT_CACHE or ~/.cache/fedshift)")
    edge_model: str = option("", "the ONNX file the edges run: uploads are preprocessed with its metadata "
                             "(default: the student exported to OUT/cloud/edge.onnx)")
    edge_models: tuple[str, ...] = option((), "more ONNX files edges may run (e.g. one per domain, same "
                                          "architecture and preprocessing): an edge registering with one of them "
                                          "gets a student that starts from that file's normalization state")
    threads: int = option(1, "torch CPU threads")
    # serving
    max_workers: int = option(8, "threads running unary RPCs (register, upload, metrics, reset); subscriptions "
                              "hold none")
    max_inflight_rpcs: int = option(256, "unary RPCs open at once beyond one subscription per edge (max_edges); "
                                    "grpc answers more with RESOURCE_EXHAUSTED, so requests cannot pile up in memory")
    rate_interval_s: float = option(5.0, "window of the logged version / upload rates, seconds")
    # backpressure: uploads are refused with RESOURCE_EXHAUSTED (edges retry with backoff) while
    # this many samples wait for the learners, so a flood cannot grow memory without bound
    max_backlog: int = option(8192, "samples waiting for the learners above which uploads get RESOURCE_EXHAUSTED")
    retry_after_s: float = option(0.5, "the wait a refused (RESOURCE_EXHAUSTED) upload is told to take before "
                                  "retrying (trailing metadata retry-after-ms; edges wait at least that long)")
    max_upload_samples: int = option(1024, "samples one upload may hold: with the image shape it sets the largest "
                                     "message the cloud accepts, and so the memory in-flight uploads can take")
    max_edges: int = option(1024, "edges the cloud serves at most (each has a learner); a new one beyond gets "
                            "RESOURCE_EXHAUSTED")
    # durability (server.checkpoint): a snapshot plus a journal of every acknowledged change
    checkpoint_dir: str = option("", "keep the cloud's state in this folder (a snapshot + a journal of every "
                                 "acknowledged change) and resume from it at start: a killed cloud loses no "
                                 "acknowledged upload (default: no checkpoints)")
    checkpoint_every_s: float = option(30.0, "seconds between snapshots while anything changed (bounds the journal "
                                       "and a restart's replay; one is also taken at shutdown)")
    journal_fsync: bool = option(False, "fsync each journal record before acknowledging it: survives a power loss, "
                                 "not only a killed process (one fsync per upload)")
    # simulation lockstep: an Upload is answered only after its learner has processed it (every
    # step it enabled), with the resulting version, so a run is reproducible from its seed; a
    # deployed cloud answers at once and learns in the background
    lockstep: bool = option(False, "simulation: answer each upload after learning from it (reproducible runs)")
    lockstep_timeout_s: float = option(120.0, "lockstep: longest wait for the learners per upload, seconds")
    cema: CemaConfig = section(CemaConfig, "the cloud step")

    def __post_init__(self) -> None:
        if self.in_chans not in (1, 3) or self.image_size < 1:
            raise ValueError(f"image_size must be >= 1 and in_chans 1 or 3, got {self.image_size}, {self.in_chans}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.checkpoint_every_s < 0:
            raise ValueError(f"checkpoint_every_s must be >= 0 (0: only at shutdown), got {self.checkpoint_every_s}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.max_upload_samples < 1:
            raise ValueError(f"max_upload_samples must be >= 1, got {self.max_upload_samples}")
        if self.max_backlog < 1 or self.max_edges < 1:
            raise ValueError(f"max_backlog and max_edges must be >= 1, got {self.max_backlog}, {self.max_edges}")
        if self.max_workers < 1 or self.max_inflight_rpcs < 1:
            raise ValueError(f"max_workers and max_inflight_rpcs must be >= 1, got {self.max_workers}, "
                             f"{self.max_inflight_rpcs}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both tls_cert and tls_key (or neither)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.insecure and self.tls_cert:
            raise ValueError("insecure (plaintext) and tls_cert contradict each other: give one")
        if self.shared and self.edge_models:
            raise ValueError("edge_models gives each edge a student from its own file; a shared student "
                             "cannot start from several: drop shared or edge_models")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of uploads = the student's input."""
        return (self.image_size, self.image_size, self.in_chans)

    @property
    def max_message_bytes(self) -> int:
        """The largest request the cloud accepts: a full upload (uint8 images, a float entropy and
        an int64 label per sample) plus room for the other fields, never above the codec's limit."""
        h, w, c = self.image_shape
        return min(MAX_MESSAGE_BYTES, self.max_upload_samples * (h * w * c + 16) + 64 * 1024)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["token"] = "***" if self.token else ""
        return d
