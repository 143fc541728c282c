"""Comparing runs: a table of all rows and, per held-out centre, a bar chart and per-class F1.

A row is what a LOCO sweep writes to ``loco.json`` (a list of rows, or ``{"rows": [...]}``)::

    {"held_out": str, "method": str, "loss": str, "macro_f1_mean": float,
     "macro_f1_std": float, "balanced_accuracy_mean": float,
     "per_class_f1": {class: float | None}, "run_dirs": [str, ...]}

``method`` is a strategy or a baseline such as ``pooled`` or ``local``. Optional:
``bn_adapted_macro_f1_mean`` (after test-time BatchNorm adaptation, or None), ``label``
(replaces "method / loss" in tables and charts), ``variant`` (what sets the row apart),
``macro_f1_interval`` (a bootstrap interval, ``common.bootstrap.macro_f1_interval``: drawn in
the ablation figure) and ``not_uncertain_share``/``not_uncertain_accuracy``. Run reports become
rows with :func:`rows_from_reports`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from server.html_report import (
    Document,
    Plot,
    Section,
    Table,
    fmt,
    new_axes,
    save_figure,
    write_document,
)

# Config keys in which repeated runs of one setting may differ (averaged into one row).
REPEAT_KEYS = ("seed", "run-name", "output-dir", "cache-dir", "device")


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def rows_from_reports(reports: list[dict]) -> list[dict]:
    """One row per held-out centre and config, averaging repeated runs (that differ only in
    :data:`REPEAT_KEYS`) over their final held-out metrics, as the LOCO sweep does.

    Rows of one centre, strategy and loss that differ in other keys are numbered in their
    ``label`` and name those keys in ``variant``.
    """
    groups: dict[str, list[dict]] = {}
    for report in reports:
        groups.setdefault(json.dumps(_setting(report), sort_keys=True), []).append(report)
    rows = []
    for runs in groups.values():
        config = runs[0]["config"]
        finals = [r["final"]["held_out"] for r in runs]
        adapted = [r["final"].get("held_out_bn_adapted") for r in runs]
        f1 = [f["macro_f1"] for f in finals]
        rows.append({
            "held_out": runs[0]["held_out_centre"], "method": config["strategy"],
            "loss": config["loss"], "macro_f1_mean": float(np.mean(f1)),
            "macro_f1_std": float(np.std(f1, ddof=1)) if len(f1) > 1 else 0.0,
            "balanced_accuracy_mean": float(np.mean([f["balanced_accuracy"] for f in finals])),
            "per_class_f1": {name: _mean([f["per_class_f1"][name] for f in finals])
                             for name in finals[0]["per_class_f1"]},
            "bn_adapted_macro_f1_mean": (_mean([a["macro_f1"] for a in adapted])
                                         if all(adapted) else None),
            "run_dirs": [r["run_dir"] for r in runs]})
    settings = [json.loads(key) for key in groups]
    for row, setting in zip(rows, settings, strict=True):
        siblings = [s for s in settings if _identity(s) == _identity(setting)]
        if len(siblings) > 1:
            shared = set.intersection(*(set(s) for s in siblings))
            differing = sorted(k for k in shared if any(s[k] != setting[k] for s in siblings))
            row["label"] = f"{_label(row)} [{siblings.index(setting) + 1}]"
            row["variant"] = ", ".join(f"{k}={setting[k]}" for k in differing)
    return rows


def _identity(setting: dict) -> tuple[str, str, str]:
    return setting["held-out"], setting["strategy"], setting["loss"]


def _setting(report: dict) -> dict:
    """The run's config without the keys in which repeated runs differ."""
    return {k: v for k, v in report["config"].items() if k not in REPEAT_KEYS}


def read_loco_rows(path: Path) -> list[dict]:
    """The rows of a sweep's ``loco.json``."""
    data = json.loads(Path(path).read_text())
    return data["rows"] if isinstance(data, dict) else data


def _label(row: dict) -> str:
    return row.get("label") or f"{row['method']} / {row['loss']}"


def sweep_notes(header: dict) -> list[str]:
    """What a LOCO sweep's header says about how its results were obtained."""
    notes = []
    if header.get("recipe_chosen_on"):
        notes.append(f"The recipe was chosen on {header['recipe_chosen_on']}.")
    if header.get("command"):
        notes.append(f"Command: {header['command']} (on {header.get('machine', '?')}, "
                     f"{header.get('date', '?')}).")
    return notes


def read_loco_notes(path: Path) -> list[str]:
    """:func:`sweep_notes` of a sweep's ``loco.json`` (none for a bare list of rows)."""
    data = json.loads(Path(path).read_text())
    return sweep_notes(data.get("header", {})) if isinstance(data, dict) else []


def plot_ablation(rows: list[dict], path: Path) -> Path:
    """Macro-F1 of each row with its bootstrap interval, one marker per held-out centre: a
    lever on and off reads as two rows."""
    labels = list(dict.fromkeys(_label(r) for r in rows))
    centres = list(dict.fromkeys(r["held_out"] for r in rows))
    fig, ax = new_axes(6.5, 0.45 * len(labels) * max(1, len(centres)) ** 0.5 + 1.6)
    step = 0.7 / max(len(centres), 1)
    for index, centre in enumerate(centres):
        mine = {_label(r): r for r in rows if r["held_out"] == centre}
        y = [i + (index - (len(centres) - 1) / 2) * step for i, label in enumerate(labels)
             if label in mine]
        shown = [mine[label] for label in labels if label in mine]
        points = [(r.get("macro_f1_interval") or {}).get("macro_f1", r["macro_f1_mean"])
                  for r in shown]
        errors = np.array([[p - r["macro_f1_interval"]["low"], r["macro_f1_interval"]["high"] - p]
                           if r.get("macro_f1_interval") else [0.0, 0.0]
                           for p, r in zip(points, shown, strict=True)]).T
        ax.errorbar(points, y, xerr=errors, fmt="o", capsize=3, label=centre)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="held-out macro-F1 (seeds pooled, 95% bootstrap interval)",
           title="Ablation: each row on every held-out centre")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title="held out", title_fontsize=8)
    return save_figure(fig, path)


def plot_centre(rows: list[dict], centre: str, path: Path) -> Path:
    """Macro-F1 (mean, std as error bar) and balanced accuracy per method on one centre."""
    fig, ax = new_axes(max(4.5, 1.3 * len(rows) + 2), 3.6)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["macro_f1_mean"] for r in rows], 0.4,
           yerr=[r["macro_f1_std"] for r in rows], capsize=3, label="macro-F1")
    ax.bar(x + 0.2, [r["balanced_accuracy_mean"] for r in rows], 0.4,
           label="balanced accuracy", color="tab:orange")
    ax.set_xticks(x, [_label(r).replace(" / ", "\n") for r in rows], fontsize=8)
    ax.set(xlim=(-0.8, len(rows) - 0.2), ylim=(0, 1.22), yticks=np.linspace(0, 1, 6),
           ylabel="score", title=f"Held-out centre {centre}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    return save_figure(fig, path)


# Sweep columns shown where rows carry them: (loco.json key, heading).
DIAGNOSES = (("accurate_share_oracle", "95%-accurate share (oracle, held-out labels)"),
             ("selection_score_mean", "val (training centres: what a recipe is chosen on)"))


def _interval_cell(row: dict) -> str:
    interval = row.get("macro_f1_interval")
    return "n/a" if not interval else f"{interval['low']:.3f}-{interval['high']:.3f}"


def comparison_document(rows: list[dict], out_dir: Path,
                        notes: Sequence[str] = ()) -> Document:
    """The comparison of ``rows``, drawing one bar chart per held-out centre and, when rows
    carry bootstrap intervals, the ablation figure into ``out_dir``; ``notes``: paragraphs on
    how the rows were obtained (a sweep's command and how its recipe was chosen)."""
    centres = list(dict.fromkeys(r["held_out"] for r in rows))
    adapted = any(r.get("bn_adapted_macro_f1_mean") is not None for r in rows)
    intervals = any(r.get("macro_f1_interval") for r in rows)
    confident = any(r.get("not_uncertain_share") is not None for r in rows)
    diagnoses = [(key, name) for key, name in DIAGNOSES
                 if any(r.get(key) is not None for r in rows)]
    summary = Table(("held-out centre", "method / loss", "macro-F1 mean ± std",
                     *(("95% CI (seeds pooled)",) * intervals),
                     *(("BN-adapted macro-F1",) * adapted), "balanced accuracy",
                     *(("not uncertain", "accuracy there") * confident),
                     *(name for _, name in diagnoses), "runs"),
                    [(r["held_out"], _label(r), f"{r['macro_f1_mean']:.3f} ± "
                      f"{r['macro_f1_std']:.3f}",
                      *((_interval_cell(r),) * intervals),
                      *((fmt(r.get("bn_adapted_macro_f1_mean")),) * adapted),
                      f"{r['balanced_accuracy_mean']:.3f}",
                      *((fmt(r.get("not_uncertain_share")),
                         fmt(r.get("not_uncertain_accuracy"))) * confident),
                      *(fmt(r.get(key)) for key, _ in diagnoses),
                      str(len(r["run_dirs"])))
                     for r in rows])
    variants = Table(("method / loss", "settings", "runs"), [
        (_label(r), r["variant"], ", ".join(Path(d).name for d in r["run_dirs"]))
        for r in rows if r.get("variant")], caption="variants")
    sections = [Section("All results", (*notes, "Metrics on each held-out centre, which never "
                                        "trained; mean and (sample) standard deviation over "
                                        "runs."),
                        (summary, variants) if variants.rows else (summary,),
                        (Plot(plot_ablation(rows, out_dir / "ablation.png"),
                              "ablation: macro-F1 and 95% bootstrap interval per row"),)
                        if intervals else ())]
    highlights = []
    for centre in centres:
        mine = [r for r in rows if r["held_out"] == centre]
        best = max(mine, key=lambda r: r["macro_f1_mean"])
        highlights.append((f"best on {centre}: {_label(best)}", f"{best['macro_f1_mean']:.3f}"))
        classes = list(mine[0]["per_class_f1"])
        per_class = Table(("method / loss", *classes), [
            (_label(r), *(fmt(r["per_class_f1"].get(c)) for c in classes)) for r in mine],
            caption="per-class F1")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", centre)
        plot = plot_centre(mine, centre, out_dir / f"comparison_{name}.png")
        sections.append(Section(f"Held-out centre {centre}", (), (per_class,),
                                (Plot(plot, f"held-out centre {centre}"),)))
    subtitle = (f"{len(rows)} result row{'s' * (len(rows) != 1)} on {len(centres)} held-out "
                f"centre{'s' * (len(centres) != 1)}: {', '.join(centres)}.")
    return Document("cytofed comparison", subtitle, sections, highlights)


def render_comparison(rows: list[dict], out_dir: Path, notes: Sequence[str] = ()) -> Path:
    """Write comparison.html, comparison.md, comparison.json and the figures into ``out_dir``;
    returns the HTML path."""
    if not rows:
        raise ValueError("nothing to compare: no runs or sweep rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps({"notes": list(notes), "rows": rows},
                                                        indent=2))
    return write_document(comparison_document(rows, out_dir, notes), out_dir, "comparison")
