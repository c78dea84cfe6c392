"""What Flower's simulation engine costs over a plain PyTorch loop doing the same training.

Same clients, data, model, local steps and FedAvg rounds, measured in one run:

- ``plain``: one process, clients trained one after another with core/training.py, FedAvg as a
  numpy weighted mean, every client evaluated on its val/test split each round (what the
  ClientApp does for every round: in the next round's train message, the last round in an
  evaluate message);
- ``flower``: ``fedshift fl``'s engine (Flower ``run_simulation``, Ray actors), with
  ``--num-cpus`` actors in parallel; by default measured with 1 CPU (same compute as ``plain``)
  and with all cores.

Each engine runs in a fresh child process; its whole process tree's resident memory (Ray's
GCS, raylet and actors included) is sampled from /proc every 0.1 s for the peak. Start-up is
separated from per-round cost as: steady round time = median of rounds 2..R, start-up = wall
time − R × steady round time (so start-up holds Ray/actor start, imports and data building).

    python benchmarks/fl_overhead.py --rounds 20 --out benchmarks/results/fl_overhead/fl_overhead.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("fl_overhead")


# ------------------------------------------------------------------------------ memory
def _tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, from /proc (no psutil needed)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int((entry / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0) for p in tree)


def _run_child(args: list[str]) -> tuple[dict[str, Any], int]:
    """Run this script as a child engine; return its JSON line and the peak tree RSS."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        proc = subprocess.Popen([sys.executable, __file__, *args, "--child-out", out.name])
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_rss_bytes(proc.pid))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait()
        finally:
            stop.set()
            sampler.join()
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        if rc != 0:
            raise RuntimeError(f"engine child failed with exit code {rc}: {args}")
        return json.loads(Path(out.name).read_text()), peak


# ------------------------------------------------------------------------------ engines
def _overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {"strategy": "fedavg", "seed": a.seed, "rounds": a.rounds, "clients": a.clients,
            "model-width": a.model_width, "image-size": a.image_size, "train-per-client": a.train_per_client,
            "local-steps": a.local_steps, "batch-size": a.batch_size, "tensorboard": False}


def engine_plain(a: argparse.Namespace) -> dict[str, Any]:
    """Sequential FedAvg in one process with the project's training loop."""
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from core.fl_config import FLConfig, build_model, clients_per_domain
    from core.training import evaluate, train_local

    torch.set_num_threads(1)
    cfg = FLConfig.from_run_config(_overrides(a))
    data = cfg.data.make(cfg.seed, cfg.image_size, domains=cfg.domains(),
                         clients_per_domain=clients_per_domain(cfg.clients))
    model = build_model(cfg)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = cfg.local_spec()  # FedAvg: no proximal term
    momentum: list[dict[str, np.ndarray]] = [{} for _ in data.clients]
    round_seconds, accs = [], []
    t_start_rounds = time.perf_counter()
    for rnd in range(1, cfg.rounds + 1):
        t = time.perf_counter()
        states, weights = [], []
        for pid, client in enumerate(data.clients):
            model.load_state_dict(global_state)
            res = train_local(model, client.train, spec, rng=np.random.default_rng([cfg.seed, pid, rnd]),
                              optimizer_state_in=momentum[pid])
            momentum[pid] = res.optimizer_state
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(res.num_examples)
        # FedAvg exactly as Flower's aggregate_arrayrecords does it (numpy, client order), so both
        # engines compute the same numbers and their accuracy curves can be compared
        factors = [wi / sum(weights) for wi in weights]
        agg: dict[str, np.ndarray] = {}
        for f, st in zip(factors, states):
            for k, v in st.items():
                agg[k] = v.numpy() * f if k not in agg else agg[k] + v.numpy() * f
        global_state = {k: torch.from_numpy(np.asarray(v)).to(states[0][k].dtype) for k, v in agg.items()}
        model.load_state_dict(global_state)
        rnd_acc = []
        for client in data.clients:
            evaluate(model, client.val)
            rnd_acc.append(evaluate(model, client.test)[1])
        accs.append(float(np.mean(rnd_acc)))
        round_seconds.append(time.perf_counter() - t)
        log.info("plain round %d/%d: mean acc %.3f, %.2fs", rnd, cfg.rounds, accs[-1], round_seconds[-1])
    return {"wall_seconds": time.perf_counter() - t0, "setup_seconds": t_start_rounds - t0,
            "round_seconds": round_seconds, "mean_accuracy": accs}


def engine_flower(a: argparse.Namespace) -> dict[str, Any]:
    """The same run through ``fedshift fl``'s Flower simulation engine."""
    t0 = time.perf_counter()
    from core.fl_config import FLConfig
    from simulations.fl_role import FLRun, SimulationResources
    from simulations.fl_sim import run_fl_simulation

    with tempfile.TemporaryDirectory() as tmp:
        run = FLRun(fl=FLConfig.from_run_config({**_overrides(a), "out-dir": tmp}),
                    simulation=SimulationResources(num_cpus=a.num_cpus, cpus_per_client=1))
        results = run_fl_simulation(run)
    hist = results.history
    return {"wall_seconds": time.perf_counter() - t0, "round_seconds": [h.round_seconds for h in hist],
            "mean_accuracy": [h.mean_accuracy for h in hist],
            # the median round: the last one also carries its own evaluate exchange
            "bytes_per_round": statistics.median(h.bytes_down + h.bytes_up for h in hist)}


def _summary(name: str, res: dict[str, Any], peak: int, rounds: int) -> dict[str, Any]:
    steady = statistics.median(res["round_seconds"][1:]) if rounds > 1 else res["round_seconds"][0]
    return {"engine": name, "wall_seconds": res["wall_seconds"], "steady_round_seconds": steady,
            "startup_seconds": res["wall_seconds"] - rounds * steady,
            "first_round_seconds": res["round_seconds"][0], "peak_rss_mb": peak / 2**20,
            "final_mean_accuracy": res["mean_accuracy"][-1], "accuracy_curve": res["mean_accuracy"],
            **{k: v for k, v in res.items() if k in ("bytes_per_round",)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-width", type=float, default=0.25)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--train-per-client", type=int, default=0, help="0: all (~215)")
    p.add_argument("--local-steps", type=int, default=0, help="0: one local epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--flower-cpus", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                   help="Ray CPU counts to measure Flower with (1 = as much compute as the plain loop)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/fl_overhead.json"))
    p.add_argument("--engine", choices=("plain", "flower"), help=argparse.SUPPRESS)
    p.add_argument("--num-cpus", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if a.engine:  # child process: run one engine, write its JSON
        res = engine_plain(a) if a.engine == "plain" else engine_flower(a)
        a.child_out.write_text(json.dumps(res))
        return 0

    common = [f"--rounds={a.rounds}", f"--clients={a.clients}", f"--seed={a.seed}", f"--model-width={a.model_width}",
              f"--image-size={a.image_size}", f"--train-per-client={a.train_per_client}",
              f"--local-steps={a.local_steps}", f"--batch-size={a.batch_size}"]
    rows = []
    res, peak = _run_child(["--engine", "plain", *common])
    rows.append(_summary("plain (1 process, 1 thread)", res, peak, a.rounds))
    for cpus in dict.fromkeys(a.flower_cpus):
        res, peak = _run_child(["--engine", "flower", f"--num-cpus={cpus}", *common])
        rows.append(_summary(f"flower simulation ({cpus} CPU{'s' if cpus > 1 else ''})", res, peak, a.rounds))
    base = rows[0]
    for row in rows[1:]:
        row["wall_ratio_vs_plain"] = row["wall_seconds"] / base["wall_seconds"]
        row["steady_round_ratio_vs_plain"] = row["steady_round_seconds"] / base["steady_round_seconds"]
        row["per_round_overhead_seconds"] = row["steady_round_seconds"] - base["steady_round_seconds"]
        # same training? (the plain loop aggregates exactly like Flower, so the curves should match)
        row["max_abs_accuracy_diff_vs_plain"] = max(
            abs(x - y) for x, y in zip(row["accuracy_curve"], base["accuracy_curve"]))
    report = {"settings": {k: v for k, v in vars(a).items() if k not in ("engine", "num_cpus", "child_out", "out")},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "results": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    for row in rows:
        log.info("%-32s wall %6.1fs  startup %5.1fs  round %.3fs  peak %6.0f MB  acc %.3f%s", row["engine"],
                 row["wall_seconds"], row["startup_seconds"], row["steady_round_seconds"], row["peak_rss_mb"],
                 row["final_mean_accuracy"],
                 f"  x{row['wall_ratio_vs_plain']:.1f} wall, x{row['steady_round_ratio_vs_plain']:.1f} per round, "
                 f"max |Δacc| vs plain {row['max_abs_accuracy_diff_vs_plain']:.4f}"
                 if "wall_ratio_vs_plain" in row else "")
    log.info("wrote %s", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
