"""The run report: report.json, report.md and figures beside them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure not registered with pyplot (no global state, no display backend)."""
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def plot_f1_over_rounds(rounds: list[dict], path: Path) -> Path:
    """Held-out macro-F1 and site validation macro-F1 per round."""
    fig, ax = _figure(6, 3.5)
    x = [r["round"] for r in rounds]
    ax.plot(x, [r["held_out"]["macro_f1"] for r in rounds], marker="o", label="held-out centre")
    val = [r["validation"].get("val_macro_f1") for r in rounds]
    if any(v is not None for v in val):
        ax.plot(x, val, marker="s", linestyle="--", label="sites' validation")
    ax.set(xlabel="round", ylabel="macro-F1", ylim=(0, 1), title="Macro-F1 over rounds")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path,
                          title: str = "Held-out confusion matrix") -> Path:
    """Row-normalised confusion matrix with counts in the cells."""
    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = _figure(1.1 * len(classes) + 2, 1.0 * len(classes) + 1.5)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def plot_per_class_f1(per_class: dict[str, float | None], path: Path) -> Path:
    """Bar chart of per-class F1 (classes absent from the centre are left out)."""
    present = {k: v for k, v in per_class.items() if v is not None}
    fig, ax = _figure(6, 3.5)
    ax.bar(list(present), list(present.values()), color="tab:purple")
    ax.set(ylim=(0, 1), ylabel="F1", title="Held-out per-class F1")
    ax.tick_params(axis="x", rotation=45)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def render_markdown(report: dict) -> str:
    """A short human summary of ``report.json``."""
    final = report["final"]["held_out"]
    lines = [
        f"# cytofed run {report['run_name']}",
        "",
        f"Held-out centre **{report['held_out_centre']}**, trained on "
        f"{', '.join(report['training_centres'])}; strategy `{report['config']['strategy']}`, "
        f"loss `{report['config']['loss']}`, model `{report['config']['model']}`.",
        "",
        "| metric | final | best by sites' validation (round "
        f"{report['best']['round']}) |",
        "|---|---|---|",
    ]
    best = report["best"]["held_out"]
    for key in ("macro_f1", "balanced_accuracy", "accuracy", "ece"):
        lines.append(f"| held-out {key} | {final[key]:.3f} | {best[key]:.3f} |")
    lines += ["", "| class | F1 |", "|---|---|"]
    lines += [f"| {name} | {'n/a' if f1 is None else f'{f1:.3f}'} |"
              for name, f1 in final["per_class_f1"].items()]
    lines += ["", "| round | train loss | sites' val macro-F1 | held-out macro-F1 | seconds |",
              "|---|---|---|---|---|"]
    for r in report["rounds"]:
        lines.append(f"| {r['round']} | {r['train'].get('train_loss', float('nan')):.4f} | "
                     f"{r['validation'].get('val_macro_f1', float('nan')):.3f} | "
                     f"{r['held_out']['macro_f1']:.3f} | {r['seconds']:.1f} |")
    incidents = [(r["round"], kind, item) for r in report["rounds"]
                 for kind in ("dropped", "rejected") for item in r[kind]]
    if incidents:
        lines += ["", "| round | event | node | reason |", "|---|---|---|---|"]
        lines += [f"| {rnd} | {kind} | {item['node_id']} | {item['reason']} |"
                  for rnd, kind, item in incidents]
    lines += ["", "![F1 over rounds](f1_over_rounds.png)",
              "![confusion matrix](confusion_matrix.png)", "![per-class F1](per_class_f1.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: Path, report: dict) -> Path:
    """Write report.json, report.md and the figures; returns the path of report.json."""
    final = report["final"]["held_out"]
    plot_f1_over_rounds(report["rounds"], run_dir / "f1_over_rounds.png")
    plot_confusion_matrix(final["confusion_matrix"], report["classes"],
                          run_dir / "confusion_matrix.png")
    plot_per_class_f1(final["per_class_f1"], run_dir / "per_class_f1.png")
    (run_dir / "report.md").write_text(render_markdown(report))
    path = run_dir / "report.json"
    path.write_text(json.dumps(report, indent=2))
    return path
