"""The run report: report.json, report.md, a self-contained report.html and the figures.

Sections: held-out results (macro-F1, balanced accuracy, per-class F1, confusion matrix), the
selected model in distribution (the training centres' test splits) against the held-out centre
(the ID-vs-OOD gap), F1 over rounds, calibration (the temperature picked from the training
sites' validation NLL, the exported model's ECE and reliability diagram at it, its
``uncertain`` threshold), each centre's class counts as its site reported them
(aggregates only), the stain statistics the sites shared (``stain-sharing``), dropped or
rejected clients, the exported model and the run config. Rounds that did not score the
held-out centre (``held-out-every``) show n/a.
``cytofed report RUN_DIR...`` rewrites them from report.json and, given several runs or a LOCO
sweep folder, compares them (see ``server.comparison``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from common import selection
from server.comparison import (
    read_loco_notes,
    read_loco_rows,
    render_comparison,
    rows_from_reports,
)
from server.export import applied_held_out
from server.html_report import (
    Document,
    Plot,
    Section,
    Table,
    fmt,
    new_axes,
    new_figure,
    save_figure,
    write_document,
)

METRICS = (("macro_f1", "macro-F1"), ("balanced_accuracy", "balanced accuracy"),
           ("accuracy", "accuracy"), ("ece", "expected calibration error"))


def plot_f1_over_rounds(rounds: list[dict], path: Path) -> Path:
    """Held-out macro-F1 (plain and BN-adapted, if any) at the rounds that scored it, and the
    sites' validation macro-F1 that selects the round at every round."""
    fig, ax = new_axes(6, 3.5)
    x = [r["round"] for r in rounds]
    scored = [r for r in rounds if r["held_out"]]
    ax.plot([r["round"] for r in scored], [r["held_out"]["macro_f1"] for r in scored],
            marker="o", label="held-out centre")
    if all(r.get("held_out_bn_adapted") for r in scored):
        ax.plot([r["round"] for r in scored],
                [r["held_out_bn_adapted"]["macro_f1"] for r in scored], marker="^",
                label="held-out, BN-adapted")
    val = [r["validation"].get(selection.SELECTION_KEY) for r in rounds]
    if any(v is not None for v in val):
        ax.plot(x, val, marker="s", linestyle="--", label="sites' validation")
    ax.set(xlabel="round", ylabel="macro-F1", ylim=(0, 1.02), title="Macro-F1 over rounds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path,
                          title: str = "Held-out confusion matrix") -> Path:
    """Row-normalised confusion matrix with counts in the cells."""
    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = new_axes(0.8 * len(classes) + 2.2, 0.7 * len(classes) + 1.8)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return save_figure(fig, path)


def plot_per_class_f1(per_class: dict[str, float | None], path: Path) -> Path:
    """Bar chart of per-class F1 (classes absent from the centre are left out)."""
    present = {k: v for k, v in per_class.items() if v is not None}
    fig, ax = new_axes(6, 3.5)
    ax.bar(list(present), list(present.values()), color="tab:purple")
    ax.set(ylim=(0, 1), ylabel="F1", title="Held-out per-class F1")
    ax.tick_params(axis="x", rotation=45)
    return save_figure(fig, path)


def plot_reliability(bins: list[dict], ece: float, path: Path) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect
    calibration, with the share of predictions per bin below."""
    fig = new_figure(5, 4.8)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    top.bar(centres, [b["accuracy"] for b in bins], width=width, color="tab:blue",
            edgecolor="white", label="accuracy")
    top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black",
             markersize=3, label="(mean confidence, accuracy)")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set(ylim=(0, 1), ylabel="accuracy", title=f"Held-out reliability (ECE {ece:.3f})")
    top.legend(loc="upper left", fontsize=8)
    total = sum(b["count"] for b in bins) or 1
    bottom.bar(centres, [b["count"] / total for b in bins], width=width, color="tab:grey")
    bottom.set(xlim=(0, 1), xlabel="confidence (top-class probability)", ylabel="share")
    return save_figure(fig, path)


def centre_class_counts(report: dict) -> dict[str, list[int]]:
    """Training class counts per centre, as each site last reported them."""
    return {client["centre"]: client["class-counts"]
            for r in report["rounds"] for client in r.get("clients", [])
            if "class-counts" in client}


def _left_out_of_held_out(report: dict) -> list[str]:
    """What the held-out centre lost to images a training centre also has, if anything."""
    data = report.get("held_out_data", {})
    paragraphs = []
    if data.get("shared_with_training"):
        paragraphs.append(f"Left out: {data['shared_with_training']} images that a training "
                          "centre also holds (byte-identical, or resized or re-encoded copies).")
    if data.get("training_centres_unchecked"):
        paragraphs.append(f"Not checked for shared images: {data['training_centres_unchecked']} "
                          "training centre(s) whose data is not on the server.")
    return paragraphs


def _at_temperature(best: dict) -> str:
    """", at temperature T" when the exported model's results are at one (report.json's
    ``best.temperature``), else nothing (reports written before temperature scaling)."""
    return f", at T={best['temperature']:.3g}" if "temperature" in best else ""


def _held_out_section(report: dict, run_dir: Path) -> Section:
    final, best = report["final"], report["best"]
    adapted = [k for k in ("final", "best") if report[k].get("held_out_bn_adapted")]
    metrics = Table(
        ("held-out metric", "final round", f"best round ({best['round']}{_at_temperature(best)})",
         *(f"{k}, BN-adapted" for k in adapted)),
        [(label, fmt(final["held_out"][key]), fmt(best["held_out"][key]),
          *(fmt(report[k]["held_out_bn_adapted"][key]) for k in adapted))
         for key, label in METRICS])
    support = np.asarray(final["held_out"]["confusion_matrix"]).sum(axis=1)
    per_class = Table(
        ("class", "held-out images", "F1 final", "F1 best"),
        [(name, str(n), fmt(f1), fmt(best["held_out"]["per_class_f1"][name]))
         for (name, f1), n in zip(final["held_out"]["per_class_f1"].items(), support,
                                  strict=True)])
    paragraphs = [
        f"Every image of {report['held_out_centre']}, a centre that never trained, scored by "
        "the server. Macro-F1 and balanced accuracy weigh rare cells like common ones. The "
        f"best round is chosen by the {best['selected_by']}, never by held-out labels."]
    paragraphs += _left_out_of_held_out(report)
    return Section(f"Held-out centre {report['held_out_centre']}", tuple(paragraphs),
                   (metrics, per_class),
                   (Plot(run_dir / "confusion_matrix.png", "confusion matrix, final round"),
                    Plot(run_dir / "per_class_f1.png", "per-class F1, final round")))


def plot_id_vs_ood(report: dict, path: Path) -> Path:
    """Macro-F1 of the selected model on each training centre's test split, on all of them
    together and on the held-out centre."""
    best = report["best"]
    tested = best["in_distribution_test"]
    labels = [*(site["centre"] for site in tested["sites"]), "training centres\n(test splits)",
              f"{report['held_out_centre']}\n(held out)"]
    values = [*(site["macro_f1"] for site in tested["sites"]), tested["macro_f1"],
              applied_held_out(best)["macro_f1"]]
    colours = ["tab:blue"] * len(tested["sites"]) + ["tab:green", "tab:red"]
    fig, ax = new_axes(max(4.0, 1.1 * len(labels) + 1), 3.5)
    ax.bar(labels, values, color=colours)
    ax.set(ylim=(0, 1.02), ylabel="macro-F1",
           title=f"Selected round {best['round']}: in distribution vs held out "
                 f"(gap {best['id_ood_gap']:.3f})")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def _in_distribution_section(report: dict, run_dir: Path) -> Section:
    best = report["best"]
    tested = best["in_distribution_test"]
    held_out = applied_held_out(best)
    rows = [(f"{site['centre']} (test split)", str(site["num_examples"]),
             fmt(site["macro_f1"]), "", "") for site in tested["sites"]]
    rows += [("training centres' test splits, summed", str(tested["num_examples"]),
              fmt(tested["macro_f1"]), fmt(tested["balanced_accuracy"]), fmt(tested["accuracy"])),
             (f"{report['held_out_centre']} (held out)", str(held_out["num_examples"]),
              fmt(held_out["macro_f1"]), fmt(held_out["balanced_accuracy"]),
              fmt(held_out["accuracy"])),
             ("gap (in distribution - held out)", "", fmt(best["id_ood_gap"]), "", "")]
    adapted = (" Both after test-time BatchNorm adaptation on the scored images, as the "
               "exported model is applied." if best.get("held_out_bn_adapted") else "")
    return Section(
        "In distribution vs held out",
        (f"The exported model (round {best['round']}) scored by every training site on its own "
         "test split, which never trained nor chose the round; the sites send confusion counts "
         "only. The gap to the held-out centre is what a new clinic loses." + adapted,),
        (Table(("scored on", "images", "macro-F1", "balanced accuracy", "accuracy"), rows),),
        (Plot(run_dir / "id_vs_ood.png", "macro-F1 in distribution and held out"),))


def _rounds_section(report: dict, run_dir: Path) -> Section:
    rows = [(str(r["round"]), fmt(r["train"].get("train_loss"), 4),
             fmt(r["validation"].get(selection.SELECTION_KEY)),
             *(fmt((r["held_out"] or {}).get(key))
               for key in ("macro_f1", "balanced_accuracy", "ece")),
             f"{r['replied']}/{r['sampled']}", f"{r['seconds']:.1f}")
            for r in report["rounds"]]
    table = Table(("round", "train loss", "sites' val macro-F1 (selects)", "held-out macro-F1",
                   "held-out bal. acc.", "held-out ECE", "sites", "seconds"), rows)
    every = report["config"].get("held-out-every", 1)
    paragraphs = (f"The held-out centre is scored every {every} rounds, at the last round and "
                  "at each round that became the selected one (held-out-every); other rounds "
                  "show n/a.",) if every > 1 else ()
    return Section("F1 over rounds", paragraphs, (table,),
                   (Plot(run_dir / "f1_over_rounds.png", "macro-F1 per round"),))


def _calibration_section(report: dict, run_dir: Path) -> Section:
    best = report["best"]
    selected = next(r for r in report["rounds"] if r["round"] == best["round"])
    paragraphs = [f"Expected calibration error of the top-class probability (15 equal-width "
                  f"bins) on the held-out centre: {fmt(report['final']['held_out']['ece'])} "
                  f"after the final round; exported model (round {best['round']}) "
                  f"{fmt(best['held_out']['ece'])}{_at_temperature(best)}"
                  + (f" ({fmt(selected['held_out']['ece'])} at T=1)."
                     if "temperature" in best else ".")]
    calibration = report.get("calibration")
    if calibration:
        nll = (f": pooled validation NLL {fmt(calibration['validation_nll'])} per image "
               f"(at T=1: {fmt(calibration['validation_nll_at_1'])})"
               if calibration["validation_nll"] is not None else "")
        paragraphs.append(
            f"Temperature T={calibration['temperature']:.3g} divides every logit of the exported "
            f"model, chosen by {calibration['selected_by']} of "
            f"{', '.join(calibration['sites']) or 'no site (T=1)'}{nll}. Each site sent only "
            "its sums of the NLL at each temperature and its image count.")
        if calibration["left_out"]:
            paragraphs.append("Left out of the choice: " + "; ".join(
                f"node {item['node_id']} ({item['reason']})" for item in calibration["left_out"]))
    tables, plots = [], []
    model = report.get("model", {})
    if model.get("uncertainty"):
        uncertainty = model["uncertainty"]
        paragraphs.append(
            f"The exported model flags a prediction as uncertain when its confidence is below "
            f"{uncertainty['threshold']:.2f}: the smallest threshold at which predictions on "
            f"{uncertainty['calibrated_on']} are wrong at most "
            f"{uncertainty['target_error']:.0%} of the time, pooled from the sites' aggregate "
            "confidence histograms (no held-out label is used).")
        rows = [("sites' validation (calibration)", fmt(uncertainty["coverage"]),
                 fmt(uncertainty["error_rate"]))]
        if "held_out_at_threshold" in model:
            share = model["held_out_at_threshold"]
            rows.append((f"held-out {report['held_out_centre']}, best round",
                         fmt(share["coverage"]), fmt(share["error_rate"])))
        tables.append(Table(("at the threshold", "coverage (confident share)",
                             "error rate when confident"), rows))
    if "reliability" in best["held_out"]:
        plots.append(Plot(run_dir / "reliability.png",
                          f"reliability diagram, exported model{_at_temperature(best)}"))
    return Section("Calibration", tuple(paragraphs), tuple(tables), tuple(plots))


def _centres_section(report: dict) -> Section:
    classes = report["classes"]
    counts = centre_class_counts(report)
    rows = [(centre, *map(str, values), str(sum(values))) for centre, values in counts.items()]
    held_out = np.asarray(report["final"]["held_out"]["confusion_matrix"]).sum(axis=1).tolist()
    rows.append((f"{report['held_out_centre']} (held out)", *map(str, held_out),
                 str(sum(held_out))))
    missing = [c for c in report["training_centres"] if c not in counts]
    paragraphs = ["Training-split class counts as each site reported them with its update, "
                  "only where its centre allows sharing them (aggregates only, no image leaves "
                  "a site); the held-out row counts the images the server evaluated."]
    if missing:
        paragraphs.append(f"No class counts reported by: {', '.join(missing)}.")
    return Section("Centres", tuple(paragraphs),
                   (Table(("centre", *classes, "total"), rows),))


def _stain_sharing_section(report: dict) -> Section:
    sharing = report["stain_sharing"]

    def numbers(values: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in values)

    shared = Table(("centre", "haematoxylin OD vector", "eosin OD vector",
                    "99th-percentile concentrations", "CIELAB mean", "CIELAB std"),
                   [(centre, numbers(style["stain_matrix"][:3]),
                     numbers(style["stain_matrix"][3:]), numbers(style["max_concentrations"]),
                     numbers(style["lab_mean"]), numbers(style["lab_std"]))
                    for centre, style in sharing["shared"].items()], caption="shared")
    others = Table(("centre", "node", "outcome", "reason"), [
        (item["centre"], str(item["node_id"]), kind, item["reason"])
        for kind in ("declined", "rejected") for item in sharing[kind]],
        caption="declined or rejected")
    paragraphs = [
        "Before round 1 each training site whose centre file allows it (share_stain = true) "
        "sent the stain statistics of its training images, numbers only: its haematoxylin and "
        "eosin optical-density vectors (R, G, B), their 99th-percentile concentrations and the "
        "CIELAB mean and spread of its pixels. The server checked and pooled them and sent the "
        "pool to every site, which re-stained its training batches towards the other sites' "
        "styles on its own device."]
    if not sharing["shared"]:
        paragraphs.append("No site shared its stain statistics: nothing was re-stained.")
    return Section("Stain-style sharing", tuple(paragraphs),
                   (shared, others) if others.rows else (shared,))


def _clients_section(report: dict) -> Section:
    centre_of = {c.get("node_id"): c.get("centre", "?")
                 for r in report["rounds"] for c in r.get("clients", [])}

    def row(when: str, kind: str, item: dict) -> tuple[str, ...]:
        event = f"{kind} {item['reply']}" if "reply" in item else kind
        node = "-" if item["node_id"] is None else str(item["node_id"])
        return when, event, node, centre_of.get(item["node_id"], "?"), item["reason"]

    rows = [row(str(r["round"]), kind, item)
            for r in report["rounds"] for kind in ("dropped", "rejected") for item in r[kind]]
    rows += [row("-", "rejected", item) for item in report.get("rejected_replies", [])]
    if not rows:
        return Section("Dropped or rejected clients",
                       ("None: every sampled site answered and every update was accepted in "
                        "every round.",))
    return Section("Dropped or rejected clients", (),
                   (Table(("round", "event", "node", "centre", "reason"), rows),))


def _privacy_section(report: dict) -> Section:
    privacy = report["privacy"]
    rows = [(str(r["round"]), f"{r['privacy']['contributions']}/{r['privacy']['denominator']}",
             str(r["privacy"]["releases"]), fmt(r["privacy"]["epsilon"]))
            for r in report["rounds"]]
    return Section("Differential privacy", (
        f"Each site clipped its update to L2 norm {privacy['clipping_norm']:g} and the server "
        f"clipped it again; every round the server released the sum of the accepted updates "
        f"over the {privacy['denominator']} training sites (a missing or rejected site adds "
        f"zero) plus Gaussian noise of standard deviation {privacy['noise_std']:.4g} (noise "
        f"multiplier {privacy['noise_multiplier']:g}). After {privacy['releases']} releases: "
        f"epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:g} "
        f"({privacy['accounting']}); every release is recorded in {privacy['ledger']} before "
        "it is sent.",
        f"Epsilon covers {privacy['covers']}. It does not cover what is sent in clear: "
        f"{'; '.join(privacy['not_covered'])}."),
        (Table(("round", "contributing sites", "releases so far", "epsilon so far"), rows),))


def _model_section(report: dict, run_dir: Path) -> Section:
    model = report.get("model")
    if model is None:
        return Section("Model", ("This run exported no model card.",))
    card = run_dir / model["card"]
    return Section("Model", (
        f"{model['card']} describes {model['weights']} (the best round's weights): taxonomy, "
        "preprocessing, backbone, training centres, held-out metrics and the uncertainty "
        "threshold. Apply it without Flower or the training config:",),
        code=(f"cytofed predict --model {card} --images DIR --out preds.csv",
              f"cytofed evaluate --model {card} --centre CENTRE.toml"))


def _config_section(config: dict) -> Section:
    items = [(key, str(value)) for key, value in config.items()]
    half = (len(items) + 1) // 2
    return Section("Configuration", (), (Table(("key", "value"), items[:half]),
                                         Table(("key", "value"), items[half:])))


def run_document(report: dict, run_dir: Path) -> Document:
    """The report of one run as a document (figures must already be in ``run_dir``)."""
    config, final = report["config"], report["final"]["held_out"]
    highlights = [("held-out macro-F1", fmt(final["macro_f1"])),
                  ("balanced accuracy", fmt(final["balanced_accuracy"])),
                  (f"exported model's calibration error{_at_temperature(report['best'])}",
                   fmt(report["best"]["held_out"]["ece"])),
                  (f"best round ({report['best']['round']}) macro-F1",
                   fmt(report["best"]["held_out"]["macro_f1"]))]
    if report["best"].get("in_distribution_test"):
        highlights.append(("ID - held-out gap", fmt(report["best"]["id_ood_gap"])))
    threshold = (report.get("model") or {}).get("uncertainty")
    if threshold:
        highlights.append(("uncertain below", f"{threshold['threshold']:.2f}"))
    if report.get("privacy"):
        highlights.append(("epsilon", f"{report['privacy']['epsilon']:.2f} "
                                      f"(delta {report['privacy']['delta']:g})"))
    subtitle = (f"Held-out centre {report['held_out_centre']}, trained on "
                f"{', '.join(report['training_centres'])}; strategy {config['strategy']}, "
                f"loss {config['loss']}, model {config['model']} at {config['image-size']} px, "
                f"{len(report['rounds'])} rounds.")
    return Document(
        f"cytofed run {Path(report['run_dir']).name}", subtitle,
        [_held_out_section(report, run_dir),
         *([_in_distribution_section(report, run_dir)]
           if report["best"].get("in_distribution_test") else []),
         _rounds_section(report, run_dir),
         _calibration_section(report, run_dir), _centres_section(report),
         *([_stain_sharing_section(report)] if report.get("stain_sharing") else []),
         _clients_section(report),
         *([_privacy_section(report)] if report.get("privacy") else []),
         _model_section(report, run_dir),
         _config_section(config)],
        highlights)


def write_report(run_dir: Path, report: dict) -> Path:
    """Write the figures, report.md, report.html and report.json; returns report.json's path."""
    final = report["final"]["held_out"]
    plot_f1_over_rounds(report["rounds"], run_dir / "f1_over_rounds.png")
    plot_confusion_matrix(final["confusion_matrix"], report["classes"],
                          run_dir / "confusion_matrix.png")
    plot_per_class_f1(final["per_class_f1"], run_dir / "per_class_f1.png")
    exported = report["best"]["held_out"]
    if "reliability" in exported:
        plot_reliability(exported["reliability"], exported["ece"], run_dir / "reliability.png")
    if report["best"].get("in_distribution_test"):
        plot_id_vs_ood(report, run_dir / "id_vs_ood.png")
    write_document(run_document(report, run_dir), run_dir, "report")
    path = run_dir / "report.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def _run_report(args: argparse.Namespace) -> int:
    reports, rows, notes = [], [], []
    for run_dir in args.run_dirs:
        if (run_dir / "loco.json").is_file():
            rows += read_loco_rows(run_dir / "loco.json")
            notes += read_loco_notes(run_dir / "loco.json")
        elif (run_dir / "report.json").is_file():
            report = json.loads((run_dir / "report.json").read_text())
            write_report(run_dir, report)
            reports.append({**report, "run_dir": str(run_dir)})
            print(run_dir / "report.html")
        else:
            raise FileNotFoundError(f"{run_dir}: holds neither report.json nor loco.json")
    if len(args.run_dirs) > 1 or rows:
        out = args.out or Path(os.path.commonpath([p.resolve() for p in args.run_dirs]))
        print(render_comparison(rows_from_reports(reports) + rows, out, notes))
    return 0


def register_report_command(parser: argparse.ArgumentParser) -> None:
    """``cytofed report RUN_DIR [RUN_DIR...] [--out DIR]``."""
    parser.description = ("Rewrite each run's report (report.html, report.md, figures) from "
                          "its report.json; with several runs or a LOCO sweep folder "
                          "(loco.json), also write comparison.html/.md/.json.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directory (report.json) or sweep folder (loco.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the comparison (default: the runs' common parent)")
    parser.set_defaults(func=_run_report)
