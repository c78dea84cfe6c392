"""``fedshift cloud``: serve CEMA cloud-edge adaptation over gRPC until SIGTERM / Ctrl-C.

Settings: ``--config cloud.toml`` and flags (:class:`server.config.CloudConfig`). Examples::

    fedshift cloud --port 50051 --out runs/cloud                      # built-in edge model + teacher
    fedshift cloud --config runs/x/adapt/configs/cloud.toml           # as a launcher started it

Without ``student_weights`` the student is the built-in edge model and without
``teacher_weights`` the teacher is the built-in robust ``teacher_resnet``; both are trained on
first use (a few minutes) and cached. Uploads are preprocessed with the metadata of the ONNX file
the edges run (``edge_model``); without one the cloud exports its student to
``OUT/cloud/edge.onnx`` and says so: that is then the file to give the edges.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from protos.config import add_config_flags, resolve_or_print
from protos.contract import token_or_env
from server.config import CloudConfig

log = logging.getLogger(__name__)

DESCRIPTION = ("Serve cloud-edge adaptation (CEMA) over gRPC: edges upload the samples their entropy "
               "filters keep, the cloud adapts its teacher on them, distils it into the edge model's "
               "normalization layers and streams each new version back. Settings: --config FILE and/or "
               "the flags below (flags win); --print-config shows the result.")


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_config_flags(p, CloudConfig, title="cloud")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_or_print(CloudConfig, args)
    if cfg is None:
        return 0
    return serve(cfg)


def _load_models(cfg: CloudConfig):
    """Student and teacher (or None) with the weights the config names, built-ins by default."""
    from core.teacher import DEFAULT_EDGE, DEFAULT_TEACHER, model_or_builtin

    kw = dict(cache=cfg.cache or None, num_classes=cfg.num_classes, image_size=cfg.image_size,
              in_chans=cfg.in_chans)
    student, student_path = model_or_builtin(cfg.student, cfg.student_weights or None, DEFAULT_EDGE, **kw)
    info: dict[str, str] = {"student": cfg.student, "teacher": cfg.teacher if cfg.cema.uses_teacher else "",
                            "student_weights": str(student_path)}
    teacher = None
    if cfg.cema.uses_teacher:
        teacher, teacher_path = model_or_builtin(cfg.teacher, cfg.teacher_weights or None, DEFAULT_TEACHER, **kw)
        info["teacher_weights"] = str(teacher_path)
    return student.eval(), (teacher.eval() if teacher is not None else None), info


def read_edge_model(path: str | Path):
    """The metadata of the ONNX file the edges run (preprocessing, classes, norm tensors)."""
    import onnx

    from protos.contract import ModelMetadata

    proto = onnx.load(str(path), load_external_data=False)
    try:
        return ModelMetadata.from_metadata({p.key: p.value for p in proto.metadata_props})
    except ValueError as exc:
        raise ValueError(f"edge model {path}: {exc}") from exc


def _edge_model(cfg: CloudConfig, student) -> tuple[Path, object]:
    """The edges' ONNX file (exported from the student when the config names none) and its metadata."""
    if cfg.edge_model:
        path = Path(cfg.edge_model)
        if not path.is_file():
            raise FileNotFoundError(f"edge_model {path} does not exist")
    else:
        from core.export import export_onnx

        path = Path(cfg.out_dir or ".") / "cloud" / "edge.onnx"
        export_onnx(student, path, (cfg.in_chans, cfg.image_size, cfg.image_size), model_name=cfg.student,
                    batch_stats=cfg.cema.edge_norm == "batch")
        log.info("exported the student to %s: give the edges this file", path)
    meta = read_edge_model(path)
    if tuple(meta.input_shape) != (cfg.in_chans, cfg.image_size, cfg.image_size):
        raise ValueError(f"edge model {path} takes {meta.input_shape}, the cloud is set for "
                         f"{(cfg.in_chans, cfg.image_size, cfg.image_size)}")
    if len(meta.class_names) != cfg.num_classes:
        raise ValueError(f"edge model {path} has {len(meta.class_names)} classes, the cloud {cfg.num_classes}")
    if meta.batch_stats != (cfg.cema.edge_norm == "batch"):
        kind = "each batch's own statistics" if meta.batch_stats else "running statistics"
        raise ValueError(f"edge model {path} normalizes with {kind}, but cema.edge_norm is "
                         f"{cfg.cema.edge_norm!r}: the student must learn as its edges predict")
    return path, meta


def _extra_edge_states(cfg: CloudConfig, primary) -> dict[str, dict]:
    """The normalization state of each file in ``edge_models``, by sha256; each must be the same
    model as ``edge_model`` up to its normalization tensors' values."""
    from protos.contract import file_sha256

    states = {}
    for name in cfg.edge_models:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"edge_models: {path} does not exist")
        meta = read_edge_model(path)
        for what in ("input_shape", "class_names", "preprocess", "batch_stats", "norm_names", "norm_shapes"):
            if getattr(meta, what) != getattr(primary, what):
                raise ValueError(f"edge_models: {path} differs from edge_model in {what}")
        if meta.norm_offsets is None:
            raise ValueError(f"edge_models: {path} keeps its norm tensors as graph inputs; export it with "
                             "initializers (the default)")
        states[file_sha256(path)] = meta.norm_state(path.read_bytes())
    return states


def serve(cfg: CloudConfig) -> int:
    """Run a cloud with resolved settings until SIGTERM / SIGINT."""
    import torch

    from protos.contract import file_sha256
    from server.cloud import CloudServer

    torch.set_num_threads(max(1, cfg.threads))
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device}: CUDA is not available here")
    if token_or_env(cfg.token) != cfg.token:
        cfg = replace(cfg, token=token_or_env(cfg.token))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.cema.seed)
        student, teacher, info = _load_models(cfg)
    edge_path, meta = _edge_model(cfg, student)
    info.update(edge_model=str(edge_path), edge_model_sha256=file_sha256(edge_path))
    edge_states = _extra_edge_states(cfg, meta)

    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    server = CloudServer(student, teacher, cfg, preprocess=meta.preprocess,
                         edge_model_sha256=info["edge_model_sha256"], edge_states=edge_states, run_info=info)
    try:
        server.start()
        if cfg.port_file:
            port_file = Path(cfg.port_file)
            port_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = port_file.with_suffix(port_file.suffix + ".tmp")
            tmp.write_text(f"{server.port}\n")
            os.replace(tmp, port_file)  # readers never see a half-written file
        print(f"fedshift cloud listening on {server.address}", flush=True)
        while not stop.wait(0.5):
            pass
        log.info("stopping")
    finally:
        server.stop(grace=2.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":  # python -m server.cloud_cli …
    parser = argparse.ArgumentParser(prog="fedshift cloud")
    configure(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run(parser.parse_args()))
