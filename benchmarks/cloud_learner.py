"""Where a cloud step's time goes: the CEMA learner's pieces timed side by side, one run.

    python benchmarks/cloud_learner.py --out runs/bench/cloud_learner.json
    python benchmarks/cloud_learner.py --quick --out /tmp/cloud_learner.json      # smoke settings

A lockstep simulation answers each upload after the learner has stepped on it, so the learner's
step is what a cell of ``benchmarks/cema_study.py`` waits for (its edges measured 0.14 s of
waiting for versions in a 58 s cell: the time is in the step itself). Timed here, per preset and
torch thread count, with the built-in architectures at 100 classes (weights untrained: cost does
not depend on them): the whole step (teacher step + teacher forward on the student batch + student
step), each piece alone, a replay-only step and encoding the published state. Trials of the
variants alternate within each repeat; figures are medians. Cloud steps/s and uploaded samples
learnt per second follow from the whole step.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.cema import CemaConfig, CemaLearner, distillation_loss  # noqa: E402
from core.models import create_model  # noqa: E402
from protos.codec import encode_state  # noqa: E402

log = logging.getLogger("bench.cloud_learner")


def _learner(preset: str, classes: int, teacher_width: int | None) -> CemaLearner:
    torch.manual_seed(0)
    student = create_model("edge_cnn", classes)
    kw = {} if teacher_width is None else {"width": teacher_width}
    teacher = create_model("teacher_resnet", classes, **kw)
    cfg = CemaConfig(preset=preset)
    learner = CemaLearner(student, teacher, cfg, num_classes=classes)
    b = cfg.batch_size
    while len(learner.replay) < cfg.replay_start:  # fill the replay so steps mix it in
        learner.add(torch.randn(b, 3, 32, 32))
        learner.step()
    return learner


def _pieces(learner: CemaLearner) -> dict[str, Callable[[], object]]:
    cfg = learner.config
    b = cfg.batch_size
    uploads = torch.randn(b, 3, 32, 32)
    batch = torch.randn((1 + cfg.replay_ratio) * b, 3, 32, 32)
    student = copy.deepcopy(learner.student)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    teacher = copy.deepcopy(learner.teacher)

    def step() -> object:
        learner.add(uploads)
        return learner.step()

    def replay_only() -> object:
        return learner.replay_step()

    def teacher_step() -> object:
        return learner.teacher_step(uploads)

    def teacher_forward() -> object:
        teacher.eval()
        with torch.no_grad():
            return teacher(batch)

    def student_step() -> object:
        student.train()
        with torch.no_grad():
            target = torch.randn(len(batch), learner.num_classes)
        loss = distillation_loss(student(batch), target, e0=learner.e0).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def publish() -> object:
        return encode_state(learner.norm_state())

    return {"step": step, "replay_only_step": replay_only, "teacher_step": teacher_step,
            "teacher_forward_student_batch": teacher_forward, "student_step": student_step, "publish": publish}


def measure(args: argparse.Namespace) -> dict:
    variants = [(p, t) for p in args.presets for t in args.threads]
    setups = {}
    for preset, threads in variants:
        torch.set_num_threads(threads)
        learner = _learner(preset, args.classes, args.teacher_width)
        pieces = _pieces(learner)
        for f in pieces.values():  # warm-up
            f()
        setups[(preset, threads)] = (learner, pieces)
    times: dict[tuple[str, int], dict[str, list[float]]] = {v: {} for v in variants}
    for rep in range(args.repeats):
        for preset, threads in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            torch.set_num_threads(threads)
            _, pieces = setups[(preset, threads)]
            for name, f in pieces.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    f()
                times[(preset, threads)].setdefault(name, []).append((time.perf_counter() - t0) / args.calls)
        log.info("repeat %d/%d done", rep + 1, args.repeats)
    out = {}
    for (preset, threads), pieces in times.items():
        learner, _ = setups[(preset, threads)]
        ms = {k: 1000 * statistics.median(v) for k, v in pieces.items()}
        b = learner.config.batch_size
        out[f"{preset}/threads{threads}"] = {
            "preset": preset, "threads": threads, "cloud_batch": b,
            "student_batch": (1 + learner.config.replay_ratio) * b, "median_ms": ms,
            "share_of_step": {k: ms[k] / ms["step"] for k in ("teacher_step", "teacher_forward_student_batch",
                                                              "student_step", "publish")},
            "cloud_steps_per_s": 1000 / ms["step"], "uploads_learnt_per_s": 1000 * b / ms["step"],
        }
    return out


def table(results: dict) -> str:
    lines = ["| preset / threads | B | step ms | teacher step | teacher fwd (student batch) | student step | "
             "publish | replay-only step ms | cloud steps/s | uploads learnt/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        ms, sh = r["median_ms"], r["share_of_step"]
        lines.append(f"| {key} | {r['cloud_batch']} | {ms['step']:.1f} | {ms['teacher_step']:.1f} "
                     f"({100 * sh['teacher_step']:.0f}%) | {ms['teacher_forward_student_batch']:.1f} "
                     f"({100 * sh['teacher_forward_student_batch']:.0f}%) | {ms['student_step']:.1f} "
                     f"({100 * sh['student_step']:.0f}%) | {ms['publish']:.2f} | {ms['replay_only_step']:.1f} | "
                     f"{r['cloud_steps_per_s']:.1f} | {r['uploads_learnt_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small", "authors"], choices=("small", "authors"))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--teacher-width", type=int, default=None, help="default: the built-in teacher's")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="calls per piece and repeat")
    p.add_argument("--quick", action="store_true", help="1 repeat, 1 call, a narrow teacher")
    p.add_argument("--out", type=Path, default=Path("runs/bench/cloud_learner.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.calls, args.teacher_width = 1, 1, 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started, load = time.monotonic(), os.getloadavg()
    results = measure(args)
    report = {"benchmark": "cloud_learner",
              "command": " ".join(["benchmarks/cloud_learner.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "loadavg_before": list(load), "loadavg_after": list(os.getloadavg())},
              "wall_s": time.monotonic() - started, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(results))
    print(f"\nwrote {args.out} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
