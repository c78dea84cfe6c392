"""``fedshift cloud``: serve CEMA cloud-edge adaptation over gRPC until SIGTERM / Ctrl-C.

Examples::

    fedshift cloud --port 50051 --out runs/cloud                      # built-in edge model + teacher
    fedshift cloud --port 0 --port-file runs/port --student edge_cnn --student-weights edge.pt \\
        --teacher timm:resnet18 --teacher-weights teacher.safetensors --method cema --out runs/c1

Without ``--student-weights`` the student is the built-in edge model and without
``--teacher-weights`` the teacher is the built-in robust ``teacher_resnet``; both are trained on
first use (a few minutes) and cached (``--cache``, ``$FEDSHIFT_CACHE`` or ~/.cache/fedshift).
``--export-edge FILE`` writes the student as the ONNX file edges must run, so both sides agree.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

TOKEN_ENV = "FEDSHIFT_TOKEN"  # the same variable the edges read


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one")
    p.add_argument("--port-file", type=Path, help="write the bound port to this file (useful with --port 0)")
    p.add_argument("--student", default="edge_cnn", help="the edge model's registry name (or timm:<name>)")
    p.add_argument("--student-weights", type=Path,
                   help="the edge model's weights (default for edge_cnn: the built-in edge model)")
    p.add_argument("--teacher", default="teacher_resnet", help="teacher registry name (or timm:<name>)")
    p.add_argument("--teacher-weights", type=Path,
                   help="teacher weights (default for teacher_resnet: the built-in robust teacher)")
    p.add_argument("--method", choices=("cema", "tent", "distill"), default="cema",
                   help="cema/distill: teacher step + distillation; tent: entropy on the student alone")
    p.add_argument("--shared", action="store_true", help="one student for all edges (default: one per edge)")
    p.add_argument("--no-replay", action="store_true", help="student batches are the uploads alone")
    p.add_argument("--no-teacher-adapt", action="store_true", help="keep the teacher fixed")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV, ""),
                   help=f"auth token every edge must send (default: ${TOKEN_ENV}, else none)")
    p.add_argument("--device", default="cpu", help="torch device of the learners: cpu, cuda, cuda:1, …")
    p.add_argument("--out", type=Path, default=Path("runs/cloud"), help="output dir (TensorBoard in OUT/cloud)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="uploads per cloud step")
    p.add_argument("--student-lr", type=float, default=1e-2)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--replay-size", type=int, default=2000)
    p.add_argument("--replay-start", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, help="cache of the built-in models")
    p.add_argument("--export-edge", type=Path, help="also write the student as the edges' ONNX model")
    p.add_argument("--edge-batch-stats", action="store_true",
                   help="with --export-edge: the edge normalizes with each batch's BN statistics")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--max-workers", type=int, default=32, help="RPC threads (each subscribed edge holds one)")
    p.add_argument("--lockstep", action="store_true",
                   help="simulation: answer each upload after learning from it (reproducible runs)")
    p.add_argument("--max-backlog", type=int, default=8192,
                   help="samples waiting for the learners above which uploads get RESOURCE_EXHAUSTED")


def _load_models(args: argparse.Namespace, uses_teacher: bool):
    """Student and teacher (or None) with the weights the flags name, built-ins by default."""
    from core.teacher import DEFAULT_EDGE, DEFAULT_TEACHER, model_or_builtin

    kw = dict(cache=args.cache, num_classes=args.num_classes, image_size=args.image_size, in_chans=args.in_chans)
    student, student_path = model_or_builtin(args.student, args.student_weights, DEFAULT_EDGE, **kw)
    info: dict[str, str] = {"student": args.student, "teacher": args.teacher if uses_teacher else "",
                            "student_weights": str(student_path)}
    teacher = None
    if uses_teacher:
        teacher, teacher_path = model_or_builtin(args.teacher, args.teacher_weights, DEFAULT_TEACHER, **kw)
        info["teacher_weights"] = str(teacher_path)
    return student.eval(), (teacher.eval() if teacher is not None else None), info


def run(args: argparse.Namespace) -> int:
    import torch

    from core.cema import CemaConfig
    from server.cloud import CloudConfig, CloudServer

    torch.set_num_threads(max(1, args.threads))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    cema = CemaConfig(method=args.method, batch_size=args.batch_size, replay=not args.no_replay,
                      replay_capacity=args.replay_size, replay_start=args.replay_start,
                      teacher_adapt=not args.no_teacher_adapt, teacher_lr=args.teacher_lr,
                      student_lr=args.student_lr, seed=args.seed)
    config = CloudConfig(host=args.host, port=args.port, token=args.token, shared=args.shared,
                         image_shape=(args.image_size, args.image_size, args.in_chans), device=args.device,
                         out_dir=str(args.out), max_workers=args.max_workers,
                         max_backlog=args.max_backlog, lockstep=args.lockstep, cema=cema)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        student, teacher, info = _load_models(args, cema.uses_teacher)
    if args.export_edge is not None:
        from core.export import export_onnx

        export_onnx(student, args.export_edge, (args.in_chans, args.image_size, args.image_size),
                    model_name=args.student, batch_stats=args.edge_batch_stats)
        info["edge_model"] = str(args.export_edge)

    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    server = CloudServer(student, teacher, config, run_info=info)
    try:
        server.start()
        if args.port_file is not None:
            args.port_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.port_file.with_suffix(args.port_file.suffix + ".tmp")
            tmp.write_text(f"{server.port}\n")
            os.replace(tmp, args.port_file)  # readers never see a half-written file
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
