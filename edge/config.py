"""The edge role's settings: one frozen dataclass, read from ``edge.toml`` and generated flags.

``fedshift edge --config edge.toml`` reads it, any flag overrides the file, ``--print-config``
prints the resolved file (``protos.config``). A launcher writes one such file per edge into its
run folder, so each edge can be re-run by hand from it. The auth token is best left out of the
file: ``$FEDSHIFT_TOKEN`` is read when ``token`` is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.logs import FORMATS, LEVELS
from edge.selection import SelectionConfig
from edge.sources import SOURCE_SPECS
from protos.config import option, section
from protos.contract import TOKEN_ENV



@dataclass(frozen=True)
class NodeConfig:
    """How the node runs (not which samples it keeps: that is ``[selection]``)."""

    limit: int | None = option(None, "stop after this many samples (default: the whole source)")
    metrics_every: int = option(20, "batches between metric reports to the cloud (0: only at the end)")
    log_every_s: float = option(10.0, "seconds between progress lines", flag="log-every")
    # lockstep for simulations (0: off, the deployed behaviour): after an acknowledged upload wait
    # up to this long for a version newer than the one the batch was predicted with, so batch t+1
    # is predicted with the cloud's step on batch t as in CEMA's protocol, however fast the edge
    sync_timeout_s: float = option(0.0, "simulation lockstep: after each upload wait up to this many seconds "
                                   "for the version its ack names (pair with a lockstep cloud; 0: never wait)",
                                   flag="sync")
    # the offline upload buffer (edge.uploader): uploads wait here, oldest sent first, while the
    # cloud is unreachable; memory is up to this many H x W x C uint8 images (8192 at 32x32x3 is
    # 25 MB, at 224x224x3 1.2 GB: lower it on a small board with a large input)
    max_buffered_samples: int = option(8192, "upload buffer bound, in samples: while the cloud is unreachable "
                                       "the edge keeps predicting and queues its uploads; beyond this many "
                                       "the oldest are dropped (counted as upload_dropped)", flag="max-buffered")
    flush_timeout_s: float = option(10.0, "seconds the edge waits for its buffered uploads to be acknowledged "
                                    "before a reset and at the end of the run (what is left then is counted "
                                    "as upload_unsent)", flag="flush-timeout")
    # the health signal (edge.health): `fedshift edge status` reads this file
    state_file: str = option("", "keep a small JSON health file here (version in force, last upload, cloud "
                             "reachable, buffer fill), rewritten every state_every_s; `fedshift edge status` "
                             "reads it (default: none)")
    state_every_s: float = option(5.0, "seconds between rewrites of the state file")

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.metrics_every < 0:
            raise ValueError(f"metrics_every must be >= 0, got {self.metrics_every}")
        if self.sync_timeout_s < 0:
            raise ValueError(f"sync_timeout_s must be >= 0, got {self.sync_timeout_s}")
        if not self.state_every_s > 0:
            raise ValueError(f"state_every_s must be > 0, got {self.state_every_s}")
        if self.max_buffered_samples < 1:
            raise ValueError(f"max_buffered_samples must be >= 1, got {self.max_buffered_samples}")
        if self.flush_timeout_s < 0:
            raise ValueError(f"flush_timeout_s must be >= 0, got {self.flush_timeout_s}")


@dataclass(frozen=True)
class EdgeConfig:
    """Everything ``fedshift edge`` needs: where the cloud is, which model, which input."""

    server: str = option("", "cloud address HOST:PORT, or 'none' to run forward-only without a cloud")
    model: str = option("", "the exported edge model (.onnx written by `fedshift export` or `fedshift run`)")
    source: str = option("", f"input: {SOURCE_SPECS} (each is described below the flags)")
    watch_poll_s: float = option(0.5, "watch:DIR: seconds between looks at the folder; a file is read once its size "
                                 "and time are the same at two looks in a row", flag="watch-poll")
    edge_id: str = option("", "this edge's id (default: host name and process id)")
    token: str = option("", f"auth token (default: ${TOKEN_ENV})")
    tls_ca: str = option("", "verify the cloud's TLS certificate against this CA (PEM)")
    tls_cert: str = option("", "mutual TLS: this edge's certificate (PEM)")
    tls_key: str = option("", "mutual TLS: this edge's private key (PEM)")
    insecure: bool = option(False, "talk plaintext gRPC to the cloud (no TLS): only on a trusted network or loopback")
    batch_size: int = option(64, "samples per inference batch")
    threads: int = option(1, "ONNX Runtime intra-op threads")
    providers: tuple[str, ...] = option(("cpu",), "ONNX Runtime execution providers in order of preference (cpu, "
                                        "cuda, tensorrt, … or full names); those this onnxruntime lacks are dropped "
                                        "with a warning, the CPU is always last")
    timeout_s: float = option(10.0, "per-RPC deadline, seconds", flag="timeout")
    connect_timeout_s: float = option(60.0, "how long registration waits for the cloud, seconds",
                                      flag="connect-timeout")
    out: str = option("", "write the run's summary (JSON) to this file")
    seed: int = option(0, "seed of the upload retries' jitter")
    log_level: str = option("info", "log level: debug, info, warning, error", choices=LEVELS)
    log_format: str = option("text", "log lines as text, or json (one object per line, for log collectors)",
                             choices=FORMATS)
    node: NodeConfig = section(NodeConfig)
    selection: SelectionConfig = section(SelectionConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not self.watch_poll_s > 0:
            raise ValueError(f"watch_poll_s must be > 0, got {self.watch_poll_s}")
        if self.timeout_s <= 0 or self.connect_timeout_s < 0:
            raise ValueError("timeout_s must be > 0 and connect_timeout_s >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("mutual TLS needs both tls_cert and tls_key (or neither)")
        if self.tls_cert and not self.tls_ca:
            raise ValueError("tls_cert / tls_key need tls_ca (the CA that signed the cloud's certificate)")
        if self.log_level not in LEVELS or self.log_format not in FORMATS:
            raise ValueError(f"log_level must be one of {LEVELS} and log_format one of {FORMATS}")
        if self.insecure and self.tls_ca:
            raise ValueError("insecure (plaintext) and tls_ca contradict each other: give one")

    def channel_credentials(self):  # -> grpc.ChannelCredentials | None
        """TLS credentials from the files; ``None`` for plaintext, which needs ``insecure``."""
        if self.tls_ca:
            from protos.tls import channel_credentials

            return channel_credentials(self.tls_ca, self.tls_cert, self.tls_key)
        if not self.insecure:
            raise ValueError("refusing plaintext gRPC to the cloud: give --tls-ca (and --tls-cert/--tls-key for "
                             "mutual TLS), or --insecure on a trusted network")
        return None

    def missing(self) -> list[str]:
        """Settings a run cannot do without (a config may be printed before they are known)."""
        return [k for k in ("server", "model", "source") if not getattr(self, k)]

    @property
    def with_cloud(self) -> bool:
        return self.server.lower() != "none"
