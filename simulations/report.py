"""``report.md`` + PNG plots from a run folder's results (``fedshift report RUN_DIR`` rebuilds it).

Reads only files the stages wrote — ``fl/<strategy>/results.json``, ``adapt/results.json``,
``adapt/edges/*.json``, ``stages.json``, ``scenario.toml``, ``command.txt`` — so a report can be
regenerated any time, also for a run that stopped early (missing parts are said to be missing).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from core.fl_config import FLResult
from edge.summary import EdgeSummary
from simulations.adapt import AdaptResult
from simulations.results import ExportSummary, read_stage_times

log = logging.getLogger(__name__)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def fl_table(fl: dict[str, FLResult]) -> str:
    domains = list(next(iter(fl.values())).per_client_accuracy)
    lines = ["| strategy | " + " | ".join(domains) + " | mean |", "|" + "---|" * (len(domains) + 2)]
    for name, r in fl.items():
        cells = [_pct(r.per_client_accuracy.get(d)) for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(r.mean_accuracy)} |")
    return "\n".join(lines)


_NORM_WORDS = {"batch": "each batch's own statistics", "running": "running statistics the cloud estimated and sent",
               "source": "the frozen source statistics"}


def adapt_table(r: AdaptResult) -> str:
    """Per corruption: no adaptation, edge BN statistics alone (no cloud), the method."""
    nan = float("nan")
    refs = [("no adaptation (source statistics)", r.no_adapt_accuracy)]
    if r.bn_stats_accuracy is not None:
        refs.append(("edge BN statistics (each batch's, no cloud)", r.bn_stats_accuracy))
    head = ["corruption", *[name for name, _ in refs], r.method, "gain vs no adaptation"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(c, [ref.per_corruption.get(c, nan) for _, ref in refs], v) for c, v in r.accuracy.per_corruption.items()]
    rows.append(("**mean**", [ref.overall for _, ref in refs], r.accuracy.overall))
    for name, base, value in rows:
        cells = [f"{100 * b:.1f}" for b in base] + [f"{100 * value:.1f}", f"{100 * (value - base[0]):+.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if r.config.streams == "domain":
        own = "its own model (that client's normalization layers)" if r.config.client_models else "the shared model"
        serve = f"Edge i streamed client i's domain (non-IID edges) and ran {own}."
    else:
        serve = "Every edge streamed the pooled test images of all domains and ran the shared model."
    lines += ["", serve, f"The edges normalized with {_NORM_WORDS[r.edge_norm]} (edge_norm = {r.edge_norm}).",
              f"Uploaded {r.uploaded:,} of {r.seen:,} samples ({100 * r.upload_rate:.1f}%); "
              f"{r.bytes_up / 1e6:.2f} MB up, {r.bytes_down / 1e6:.2f} MB down; "
              f"{r.versions_applied} parameter versions applied at the edges."]
    if r.uploaded_per_corruption:
        lines.append("Uploads per corruption: " + ", ".join(f"{c} {n}" for c, n in r.uploaded_per_corruption.items())
                     + ".")
    return "\n".join(lines)


def edge_models(r: AdaptResult, run: Path) -> str:
    """Which model file(s) the edges ran, by path (relative to the run) and sha256."""
    files: dict[tuple[str, str], list[str]] = {}
    for e in r.per_edge:
        files.setdefault((e.model_path, e.model_sha256), []).append(str(e.edge_id))
    lines = []
    for (path, sha), edges in files.items():
        try:
            shown = Path(path).resolve().relative_to(run.resolve())
        except ValueError:
            shown = Path(path)
        lines.append(f"- `{shown}` (sha256 `{sha[:16]}…`): {', '.join(edges)}")
    return "\n".join(lines)


def plot_edges(edges: list[EdgeSummary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for s in edges:
        t = s.timeline
        correct = labelled = 0
        xs, ys = [], []
        for seen, n, c in zip(t.seen, t.n, t.correct):
            if c is None:
                continue
            correct, labelled = correct + c, labelled + n
            xs.append(seen)
            ys.append(100 * correct / labelled)
        if xs:
            ax.plot(xs, ys, label=str(s.edge_id))
    ax.set_xlabel("samples seen by the edge")
    ax.set_ylabel("online accuracy (%)")
    ax.set_title("edges: online accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    parts = [f"# fedshift run: {run.name}", ""]
    command = (run / "command.txt").read_text().strip() if (run / "command.txt").is_file() else "(unknown)"
    scenario = (run / "scenario.toml").read_text() if (run / "scenario.toml").is_file() else ""
    parts += ["Reproduce (same seed → same numbers):", "", "```bash", command, "```", ""]

    fl = {p.parent.name: FLResult.read(p) for p in sorted((run / "fl").glob("*/results.json"))}
    parts += ["## Federated training", ""]
    if fl:
        parts += ["Final test accuracy per client domain (%):", "", fl_table(fl), ""]
        if (run / "export" / "deployed.json").is_file():
            deployed = ExportSummary.read(run / "export" / "deployed.json")
            files = ", ".join(f"`export/{name}`" for name in deployed.files)
            parts += [f"Exported for the edges: the **{deployed.strategy}** model after round {deployed.round} "
                      f"({files}).", ""]
        from simulations.fl_compare import plot_accuracy

        plot_accuracy(list(fl.values()), plots / "fl_accuracy.png")
        parts += ["![accuracy vs round](plots/fl_accuracy.png)", ""]
    else:
        parts += ["(no federated results in this folder)", ""]

    parts += ["## Cloud-edge adaptation", ""]
    if (run / "adapt" / "results.json").is_file():
        adapt = AdaptResult.read(run / "adapt" / "results.json")
        cfg = adapt.config
        parts += [f"Method `{adapt.method}` ({adapt.about}); {adapt.edges} edge process(es); "
                  f"{len(cfg.corruptions)} corruption(s) at severity {cfg.severity}, protocol "
                  f"{cfg.protocol}. The edges ran:", "", edge_models(adapt, run), "",
                  "Online accuracy (%):", "", adapt_table(adapt), ""]
        edges = [EdgeSummary.read(p) for p in sorted((run / "adapt" / "edges").glob("*.json"))]
        plot_edges(edges, plots / "edge_accuracy.png")
        parts += ["![online accuracy vs samples](plots/edge_accuracy.png)", ""]
    else:
        parts += ["(no adaptation results in this folder)", ""]

    stages = read_stage_times(run)
    parts += ["## Timing", "", "| stage | seconds |", "|---|---|"]
    parts += [f"| {k} | {v.seconds:.1f} |" for k, v in stages.items()]
    parts += [f"| **total** | {sum(v.seconds for v in stages.values()):.1f} |", ""]
    parts += ["## Monitoring", "", "```bash", f"tensorboard --logdir {run}", "```", ""]
    if scenario:
        parts += ["## Resolved scenario", "", "```toml", scenario.strip(), "```", ""]
    path = run / "report.md"
    path.write_text("\n".join(parts))
    return path
