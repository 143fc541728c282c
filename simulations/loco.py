"""Leave-one-centre-out benchmark: ``cytofed loco``.

Every centre of a centres file is held out in turn. For each held-out centre, method, loss and
seed one run of a method of ``common.methods``: a federated one on Flower's simulation engine
(one SuperNode per training centre, no image leaves its site), or a centralised reference of
:mod:`simulations.baselines` (``pooled``, ``local``), which writes the same run directory.
Pooled ERM with cross-entropy is always in the table. Every run is scored at the round chosen
by one rule (``common.selection.best_round``), never by the held-out centre's labels.

The runs share one recipe: ``--recipe FILE`` (a flat TOML file of run-config keys, e.g.
``simulations/recipes/robust.toml``) under ``--run-config`` under the explicit flags. With
``--variants "name: key=value ...; name2: key=value ..."`` each named variant of the recipe is
run like a method (its keys over the recipe) and is a row of the tables: one command gives each
lever on and off.

``DIR/loco.json`` holds a header (command, machine, date, recipe, selection rule) and one row
per held-out centre x variant x method x loss: macro-F1 over seeds, a bootstrap 95% interval of
the seed-pooled confusion matrix's macro-F1 (``common.bootstrap``), the share of predictions
not flagged ``uncertain`` and their accuracy, BN-adapted macro-F1 apart; ``DIR/loco.md`` renders
it. Finished runs are kept in ``DIR/runs/`` and reused when the sweep is run again with the
same settings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.bootstrap import macro_f1_interval
from common.config import (
    ConfigError,
    RunConfig,
    load_recipe,
    parse_run_config,
    resolve_centres,
    training_centres,
)
from common.data import CentreSpec
from common.methods import METHODS
from common.metrics import TARGET_ERROR, confident_share, uncertainty_threshold
from common.selection import SELECTED_BY, SELECTION_KEY
from common.train import resolve_device

REFERENCE = ("pooled", "ce")  # pooled ERM with cross-entropy: the row every method is compared to
SELECTION = (f"checkpoint: the round with the best {SELECTED_BY} (a pooled model's centres, a "
             "local model's own centre), never the held-out centre's labels; hyper-parameters: "
             "the command's recipe, fixed before the sweep")
RECIPE_CHOSEN_ON = "the training centres' validation splits only (no held-out centre's labels)"
# Keys that identify a run of the sweep: a variant cannot set them.
RUN_KEYS = ("held-out", "seed", "run-name", "output-dir", "data-source", "recipe")
VARIANT_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass(frozen=True)
class Run:
    """One training run of the sweep."""

    held_out: str
    method: str
    loss: str
    seed: int
    variant: str = ""  # the name of a variant of the recipe ("": the recipe as given)

    @property
    def name(self) -> str:
        variant = f"{self.variant}-" if self.variant else ""
        return f"{self.held_out}-{variant}{self.method}-{self.loss}-s{self.seed}"

    @property
    def is_reference(self) -> bool:
        return (self.method, self.loss) == REFERENCE and not self.variant


def plan(held_out: list[str], methods: list[str], losses: list[str], seeds: int,
         variants: dict[str, dict[str, Any]] | None = None) -> list[Run]:
    """Every run, held-out centre by held-out centre, pooled cross-entropy always included.

    With ``variants`` (name -> run-config keys) each variant replaces the plain recipe: it runs
    with every method and loss, or with its own ``strategy`` and ``loss`` where it sets them.
    """
    combos = [(m, loss, "") for m in methods for loss in losses]
    if variants:
        combos = list(dict.fromkeys(
            (method, loss, name) for name, keys in variants.items()
            for method in ([keys["strategy"]] if "strategy" in keys else methods)
            for loss in ([keys["loss"]] if "loss" in keys else losses)))
    if (*REFERENCE, "") not in combos:
        combos.insert(0, (*REFERENCE, ""))
    return [Run(h, m, loss, s, v) for h in held_out for m, loss, v in combos
            for s in range(seeds)]


def run_overrides(run: Run, recipe: dict[str, Any], reference: dict[str, Any], out: Path,
                  variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run config of one run: the sweep's recipe with the run's variant over it (or the
    ``reference`` overrides for the pooled cross-entropy reference) plus what identifies the
    run."""
    if run.is_reference:
        recipe = {**recipe, **reference}
    if run.variant:
        recipe = {**recipe, **(variants or {})[run.variant]}
    return {**recipe, "held-out": run.held_out, "strategy": run.method, "loss": run.loss,
            "seed": run.seed, "run-name": run.name, "output-dir": str(out / "runs")}


def parse_variants(text: str) -> dict[str, dict[str, Any]]:
    """``"name: key=value ...; name2: key=value ..."`` as name -> run-config keys (a variant
    may set none: the recipe as it is)."""
    variants: dict[str, dict[str, Any]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, colon, keys = part.partition(":")
        name = name.strip()
        if not colon or not VARIANT_NAME.fullmatch(name):
            raise ValueError(f"--variants: {part!r} is not 'name: key=value ...' with a name "
                             "of letters, digits and . _ + -")
        if name in variants:
            raise ValueError(f"--variants: the name {name!r} is used twice")
        try:
            variants[name] = _parse_overrides(keys.strip())
        except ValueError as error:
            raise ValueError(f"--variants {name}: {error}") from error
        fixed = sorted(set(variants[name]) & set(RUN_KEYS))
        if fixed:
            raise ValueError(f"--variants {name}: {fixed[0]!r} identifies a run of the sweep "
                             f"and cannot vary (keys {', '.join(RUN_KEYS)})")
    return variants


def run_federated(overrides: dict[str, Any], supernodes: int) -> list[Path]:
    """One federated run on Flower's simulation engine (with ``CYTOFED_FLOWER_ENGINE=deployment``
    on a local SuperLink and SuperNodes, no Ray); returns its report.json."""
    from simulations.local_deployment import engine, run_deployed

    if engine() == "deployment":
        return [run_deployed(overrides, supernodes)]
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    config = parse_run_config(overrides)
    cpus = os.cpu_count() or 1
    gpus = int(resolve_device(config.device).type == "cuda")  # shared by the sites
    backend = {"init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False},
               "client_resources": {"num_cpus": max(1, cpus // supernodes),
                                    "num_gpus": gpus / supernodes}}
    run_simulation(build_server_app(overrides), build_client_app(overrides),
                   num_supernodes=supernodes, backend_config=backend)
    reports = [p for p in Path(config.output_dir).glob(f"*-{config.run_name}*/report.json")
               if json.loads(p.read_text())["config"] == config.to_dict()]
    if not reports:
        raise RuntimeError(f"federated run {config.run_name} wrote no report")
    report = max(reports, key=lambda p: p.stat().st_mtime)
    if any(r["replied"] == 0 for r in json.loads(report.read_text())["rounds"]):
        raise RuntimeError(f"federated run {config.run_name}: no site answered in some round "
                           f"(see the log and {report})")
    return [report]


def execute(run: Run, overrides: dict[str, Any], supernodes: int, out: Path) -> list[Path]:
    """The reports of ``run``: reused from an earlier sweep with the same config, else trained."""
    record = out / "runs" / f"{run.name}.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous["overrides"] == overrides and all(map(os.path.isfile, previous["reports"])):
            return [Path(p) for p in previous["reports"]]
    if METHODS[run.method].federated:
        reports = run_federated(overrides, supernodes)
    else:
        from simulations.baselines import run_centralised

        reports = run_centralised(parse_run_config(overrides))
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"overrides": overrides, "reports": [str(p) for p in reports]}))
    return reports


def timed_execute(run: Run, overrides: dict[str, Any], supernodes: int,
                  out: Path) -> tuple[Run, list[Path], float]:
    """:func:`execute` and its wall time."""
    started = time.perf_counter()
    reports = execute(run, overrides, supernodes, out)
    return run, reports, time.perf_counter() - started


def share_cores(jobs: int) -> None:
    """Give a job process its share of the CPU cores, for torch and the Ray workers it starts
    (they inherit the environment): thread pools as large as the machine in every job
    oversubscribe it, and threads waiting for descheduled peers stall each other (two jobs of
    two processes each on 2 cores scored 8 images/s at 48 px). An explicit
    ``OMP_NUM_THREADS`` wins."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def executed(runs: list[Run], overrides: dict[Run, dict[str, Any]], supernodes: dict[Run, int],
             out: Path, jobs: int) -> Iterator[tuple[Run, list[Path], float]]:
    """Each run's reports and seconds as it finishes: one after another, or ``jobs`` at once,
    each in its own process (a federated run starts its own Ray instance there)."""
    if jobs == 1:
        for run in runs:
            yield timed_execute(run, overrides[run], supernodes[run], out)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch or Ray state
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=share_cores,
                             initargs=(jobs,)) as pool:
        futures = [pool.submit(timed_execute, run, overrides[run], supernodes[run], out)
                   for run in runs]
        for future in as_completed(futures):
            yield future.result()


def selected_results(run: Run, reports: list[Path]) -> dict[str, dict]:
    """Method label -> the report's ``best`` entry ({"held_out", "held_out_bn_adapted",
    "in_distribution_test", "id_ood_gap"}, the last two None in reports that lack them) and
    ``confident``: the held-out predictions at or above the exported card's ``uncertain``
    threshold (:func:`confident_counts`).

    A model per training centre (``local``) gives one label per centre and the method's: their
    mean, their summed confusion matrices and confident counts.
    """
    loaded = [json.loads(p.read_text()) for p in reports]
    bests = [{"in_distribution_test": None, "id_ood_gap": None, **r["best"],
              "confident": confident_counts(r), "selection_score": selected_round_score(r)}
             for r in loaded]
    if len(reports) == 1:
        return {run.method: bests[0]}
    per_centre = {f"{run.method}:{'+'.join(r['training_centres'])}": b
                  for r, b in zip(loaded, bests, strict=True)}
    mean = {key: _mean_metrics([b[key] for b in bests])
            for key in ("held_out", "held_out_bn_adapted", "in_distribution_test")}
    return {run.method: {**mean, **{key: _mean_or_none([b[key] for b in bests])
                                    for key in ("id_ood_gap", "selection_score")},
                         "confident": _summed_counts([b["confident"] for b in bests])},
            **per_centre}


def selected_round_score(report: dict) -> float | None:
    """The training centres' validation score (``common.selection.SELECTION_KEY``) of the round
    the report's ``best`` names, the only score a recipe may be chosen on; None in reports
    without it (where ``common.selection.selection_score`` would give its -1 sentinel)."""
    chosen = next((r for r in report.get("rounds", [])
                   if r["round"] == report["best"].get("round")), {})
    return chosen.get("validation", {}).get(SELECTION_KEY)


def accurate_share(histograms: list[dict | None]) -> float | None:
    """The largest share of held-out predictions that one confidence threshold keeps at most
    ``TARGET_ERROR`` wrong, from the held-out confidence histograms summed over seeds: whether
    the model's confidences could support the lab's goal on this centre at all. It reads
    held-out labels, so it diagnoses and is never exported (the card's threshold is chosen on
    the training centres). None when a histogram is missing."""
    if not histograms or None in histograms:
        return None
    correct, wrong = (np.sum([h[key] for h in histograms], axis=0) for key in ("correct", "wrong"))
    return uncertainty_threshold(correct, wrong, TARGET_ERROR)["coverage"]


def confident_counts(report: dict) -> dict[str, int] | None:
    """Held-out predictions of the selected round (plain) not flagged ``uncertain`` by the
    exported card's threshold: ``{"confident", "correct", "total"}`` from the held-out
    confidence histogram; None without a threshold or histogram."""
    threshold = ((report.get("model") or {}).get("uncertainty") or {}).get("threshold")
    histogram = report["best"]["held_out"].get("confidence_histogram")
    if threshold is None or histogram is None:
        return None
    share = confident_share(histogram["correct"], histogram["wrong"], threshold)
    total = int(sum(histogram["correct"]) + sum(histogram["wrong"]))
    confident = round(share["coverage"] * total)
    return {"confident": confident, "total": total,
            "correct": confident - round((share["error_rate"] or 0.0) * confident)}


def _summed_counts(counts: list[dict[str, int] | None]) -> dict[str, int] | None:
    if not counts or None in counts:
        return None
    return {key: sum(c[key] for c in counts) for key in counts[0]}


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean of ``values``, or None when one is missing."""
    return float(np.mean(values)) if values and None not in values else None


def _mean_metrics(results: list[dict | None]) -> dict | None:
    """Mean macro-F1, balanced accuracy and per-class F1 of several results, and their summed
    confusion matrix (None if any result is)."""
    if not results or any(r is None for r in results):
        return None
    matrices = [r.get("confusion_matrix") for r in results]
    return {"macro_f1": float(np.mean([r["macro_f1"] for r in results])),
            "balanced_accuracy": float(np.mean([r["balanced_accuracy"] for r in results])),
            "per_class_f1": _mean_per_class([r["per_class_f1"] for r in results]),
            "confusion_matrix": (np.sum(matrices, axis=0).tolist()
                                 if None not in matrices else None)}


def _mean_per_class(per_class: list[dict[str, float | None]]) -> dict[str, float | None]:
    classes = per_class[0]
    return {c: (float(np.mean(values)) if (values := [p[c] for p in per_class
                                                      if p[c] is not None]) else None)
            for c in classes}


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def pooled_interval(results: list[dict]) -> dict | None:
    """Bootstrap 95% interval of the macro-F1 of the held-out confusion matrices of
    ``results`` (one per seed) summed (``common.bootstrap.macro_f1_interval``); None when a
    result has no matrix."""
    matrices = [r.get("confusion_matrix") for r in results]
    if not matrices or None in matrices:
        return None
    return macro_f1_interval(np.sum(np.asarray(matrices, dtype=np.int64), axis=0))


def summarise(results: list[tuple[Run, dict[str, dict], list[Path]]],
              variants: dict[str, dict[str, Any]] | None = None) -> list[dict]:
    """loco.json rows: one per held-out centre x variant x method label x loss, aggregated
    over seeds (``variants``: name -> keys, described in the rows of variant runs)."""
    groups: dict[tuple[str, str, str, str], list[tuple[dict, list[Path]]]] = {}
    for run, labelled, reports in results:
        for label, result in labelled.items():
            groups.setdefault((run.held_out, run.variant, label, run.loss), []).append(
                (result, reports))
    rows = []
    for (held_out, variant, method, loss), members in groups.items():
        plain = [m["held_out"] for m, _ in members]
        adapted = [m["held_out_bn_adapted"] for m, _ in members]
        confident = _summed_counts([m.get("confident") for m, _ in members])
        f1 = [r["macro_f1"] for r in plain]
        rows.append({
            "held_out": held_out, "method": method, "loss": loss,
            **({"variant_name": variant, "label": f"{variant}: {method} / {loss}",
                "variant": " ".join(f"{k}={v!r}" for k, v in (variants or {})
                                    .get(variant, {}).items()) or "the recipe as it is"}
               if variant else {}),
            "macro_f1_mean": float(np.mean(f1)), "macro_f1_std": _std(f1),
            "macro_f1_interval": pooled_interval(plain),
            "balanced_accuracy_mean": float(np.mean([r["balanced_accuracy"] for r in plain])),
            "per_class_f1": _mean_per_class([r["per_class_f1"] for r in plain]),
            "bn_adapted_macro_f1_mean": (float(np.mean([r["macro_f1"] for r in adapted]))
                                         if all(adapted) else None),
            "not_uncertain_share": (confident["confident"] / confident["total"]
                                    if confident else None),
            "not_uncertain_accuracy": (confident["correct"] / confident["confident"]
                                       if confident and confident["confident"] else None),
            "id_test_macro_f1_mean": _mean_or_none([
                m["in_distribution_test"]["macro_f1"] if m["in_distribution_test"] else None
                for m, _ in members]),
            "id_ood_gap_mean": _mean_or_none([m["id_ood_gap"] for m, _ in members]),
            "selection_score_mean": _mean_or_none([m.get("selection_score") for m, _ in members]),
            "accurate_share_oracle": accurate_share([p.get("confidence_histogram") for p in plain]),
            "seeds": len(members),
            "run_dirs": sorted({str(p.parent) for _, paths in members for p in paths}),
        })
    return rows


def machine() -> str:
    """The GPU's name, or the CPU's model and core count."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in
              (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
              if line.startswith("model name")]
    return f"CPU {models[0] if models else platform.processor()}, {os.cpu_count()} cores"


def shell_join(argv: list[str]) -> str:
    """``argv`` as a shell command line; arguments holding single quotes (run-config strings)
    are double-quoted when that is safe, which reads better than shlex's escapes."""
    return " ".join(f'"{a}"' if "'" in a and not set(a) & set('"$`\\!') else shlex.quote(a)
                    for a in argv)


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _interval(interval: dict | None) -> str:
    return "n/a" if interval is None else (f"{_points(interval['low'])}-"
                                           f"{_points(interval['high'])}")


def _row_key(row: dict) -> tuple[str, str, str]:
    return row.get("variant_name", ""), row["method"], row["loss"]


def render_markdown(header: dict, rows: list[dict]) -> str:
    """loco.md: the recipe, one table per held-out centre and the mean over centres."""
    lines = ["# Leave-one-centre-out benchmark", "",
             f"- command: `{header['command']}`", f"- machine: {header['machine']}",
             f"- date: {header['date']}", f"- selection: {header['selection']}",
             f"- recipe chosen on: {header.get('recipe_chosen_on', 'not recorded')}",
             *([f"- recipe file: `{header['recipe_file']}`"] if header.get("recipe_file")
               else []),
             f"- recipe: `{json.dumps(header['recipe'], sort_keys=True)}`",
             *([f"- variants: `{json.dumps(header['variants'])}`"] if header.get("variants")
               else []),
             "- pooled CE reference: " + (f"the recipe with `{json.dumps(header['reference'])}`"
                                          if header["reference"] else "the same recipe")
             + "; with local-steps it takes that many steps per round per training centre", "",
             "Macro-F1, balanced accuracy and per-class F1 on the held-out centre, in points "
             "(mean ± std over seeds). 95% CI: percentile bootstrap of the macro-F1 of the "
             "seeds' held-out confusion matrices summed (each class resampled apart). Not "
             "uncertain: the share of held-out predictions at or above the exported model's "
             "`uncertain` threshold, and their accuracy. 95%-accurate share (oracle): the "
             "largest share of held-out predictions one confidence threshold keeps at 95% "
             "accuracy, read from held-out labels (a diagnosis of the confidences, never "
             "exported). Val (training): the training centres' validation score that selected "
             "the round, the only score a recipe may be chosen on. BN-adapted: after test-time "
             "BatchNorm adaptation on the held-out centre's unlabelled images, reported apart "
             "from the plain results. ID test: the selected model on the training centres' "
             "own test splits (summed confusion counts); gap: ID test minus held-out macro-F1 "
             "as the model is applied."]
    classes = list(rows[0]["per_class_f1"]) if rows else []
    varied = any(r.get("variant_name") for r in rows)
    lead = ("variant", "method", "loss") if varied else ("method", "loss")

    def names(row: dict) -> str:
        key = _row_key(row) if varied else _row_key(row)[1:]
        return " | ".join(part or "-" for part in key)

    for held_out in dict.fromkeys(r["held_out"] for r in rows):
        columns = [*lead, "macro-F1", "95% CI", "BN-adapted macro-F1", "balanced acc.",
                   *(f"F1 {c}" for c in classes), "not uncertain", "accuracy there",
                   "95%-accurate share (oracle)", "ID test macro-F1", "gap", "val (training)",
                   "seeds"]
        lines += ["", f"## Held-out centre: {held_out}", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]
        for r in (r for r in rows if r["held_out"] == held_out):
            lines.append(
                f"| {names(r)} | {_points(r['macro_f1_mean'])} ± {_points(r['macro_f1_std'])} "
                f"| {_interval(r.get('macro_f1_interval'))} | "
                f"{_points(r['bn_adapted_macro_f1_mean'])} | "
                f"{_points(r['balanced_accuracy_mean'])} | "
                + " | ".join(_points(r["per_class_f1"][c]) for c in classes)
                + f" | {_points(r.get('not_uncertain_share'))} | "
                f"{_points(r.get('not_uncertain_accuracy'))} | "
                f"{_points(r.get('accurate_share_oracle'))} | "
                f"{_points(r.get('id_test_macro_f1_mean'))} | "
                f"{_points(r.get('id_ood_gap_mean'))} | "
                f"{_points(r.get('selection_score_mean'))} | {r['seeds']} |")
    columns = [*lead, "macro-F1", "vs pooled CE", "lowest centre", "BN-adapted macro-F1",
               "ID test macro-F1", "gap", "95%-accurate share (oracle)", "val (training)"]
    lines += ["", "## Mean over held-out centres", "", "| " + " | ".join(columns) + " |",
              "|" + "---|" * len(columns)]
    reference = _mean_over_centres(rows, ("", *REFERENCE), "macro_f1_mean")
    centres = {r["held_out"] for r in rows}
    keys = [key for key in dict.fromkeys(map(_row_key, rows))
            if {r["held_out"] for r in rows if _row_key(r) == key} == centres]
    for key in keys:  # one local model per centre exists for only some held-out ones
        mean = _mean_over_centres(rows, key, "macro_f1_mean")
        adapted, tested, gap, accurate, validation = (
            _mean_over_centres(rows, key, name) for name in (
                "bn_adapted_macro_f1_mean", "id_test_macro_f1_mean", "id_ood_gap_mean",
                "accurate_share_oracle", "selection_score_mean"))
        lowest = min(r["macro_f1_mean"] for r in rows if _row_key(r) == key)
        gain = f"{100 * (mean - reference):+.1f}" if reference is not None else "n/a"
        row = next(r for r in rows if _row_key(r) == key)
        lines.append(f"| {names(row)} | {_points(mean)} | {gain} | {_points(lowest)} | "
                     f"{_points(adapted)} | {_points(tested)} | {_points(gap)} | "
                     f"{_points(accurate)} | {_points(validation)} |")
    return "\n".join(lines) + "\n"


def _mean_over_centres(rows: list[dict], key: tuple[str, str, str],
                       name: str) -> float | None:
    return _mean_or_none([r.get(name) for r in rows if _row_key(r) == key])


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# Flags that set a run-config key: (attribute, key); unset (None) they leave the recipe's value.
FLAG_KEYS = (("model", "model"), ("image_size", "image-size"), ("rounds", "num-server-rounds"),
             ("local_epochs", "local-epochs"), ("device", "device"))


def recipe_file(name: str) -> Path:
    """``--recipe``'s file: as given (from the working directory), else from the project
    root (``common.config.recipe_path``)."""
    from common.config import recipe_path

    path = Path(name).expanduser()
    return path.resolve() if path.is_file() else recipe_path(name)


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys every run shares: the defaults of the flags, the ``--recipe`` file
    over them, ``--run-config`` over it and the explicit flags over everything."""
    recipe = load_recipe(str(recipe_file(args.recipe))) if args.recipe else {}
    given = _parse_overrides(args.run_config)
    if "recipe" in given:
        raise ValueError("--run-config: give the recipe file with --recipe")
    defaults = RunConfig().to_dict()
    merged = {**{key: defaults[key] for _, key in FLAG_KEYS}, **recipe, **given,
              **{key: getattr(args, flag) for flag, key in FLAG_KEYS
                 if getattr(args, flag) is not None}}
    cache = Path(merged.get("cache-dir", RunConfig.cache_dir)).resolve()  # simulation workers
    return {**merged, "cache-dir": str(cache),  # may start elsewhere than this process
            "data-source": str(Path(args.centres).resolve())}


def _parse_overrides(text: str) -> dict[str, Any]:
    """Run-config overrides written as for `flwr run --run-config`; a pair Flower's parser
    would skip in silence (``key=`` without a value) is an error."""
    from flwr.common.config import parse_config_args

    try:
        parsed = parse_config_args([text] if text.strip() else None)
    except Exception:  # Flower's parser raises a click exception
        parsed = None
    written = re.findall(r"(?:^|\s)([\w.-]+)\s*=", text)
    if parsed is None or sorted(parsed) != sorted(set(written)) or (text.strip() and not parsed):
        raise ValueError(f"cannot read {text!r} as key=value pairs: expected for example "
                         "\"image-size=96 augment='domain'\"")
    return parsed


def _held_out(args: argparse.Namespace, centres: list[CentreSpec]) -> list[str]:
    names = [c.name for c in centres]
    chosen = names if args.held_out == "all" else _names(args.held_out)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ValueError(f"--held-out {unknown[0]!r} is not a centre of {args.centres}: {names}")
    return chosen


def write_tables(out: Path, header: dict, rows: list[dict]) -> None:
    """``out/loco.json`` and ``out/loco.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "loco.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    (out / "loco.md").write_text(render_markdown(header, rows))


def run_loco(args: argparse.Namespace) -> int:
    """Run the sweep described by ``args``; loco.json and loco.md are rewritten after each run."""
    from common.centres import read_centres

    out = Path(args.out).resolve()
    recipe = _recipe(args)
    methods, losses = _names(args.strategies), _names(args.losses)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    if args.seeds < 1 or args.jobs < 1:
        raise ValueError("--seeds and --jobs must be at least 1")
    centres = read_centres(Path(args.centres))
    variants = parse_variants(args.variants)
    runs = plan(_held_out(args, centres), methods, losses, args.seeds, variants)
    reference = _parse_overrides(args.reference_config)
    overrides = {run: run_overrides(run, recipe, reference, out, variants) for run in runs}
    for run, keys in overrides.items():  # every config checked up front
        try:
            resolve_centres(parse_run_config(keys))
        except ConfigError as error:
            raise ValueError(f"{run.name}{f' (variant {run.variant})' if run.variant else ''}"
                             f": {error}") from error
    header = {"command": shell_join(["cytofed", *sys.argv[1:]]), "machine": machine(),
              "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "selection": SELECTION,
              "recipe_chosen_on": RECIPE_CHOSEN_ON,
              "recipe_file": str(recipe_file(args.recipe)) if args.recipe else None,
              "recipe": recipe, "variants": variants, "reference": reference}
    supernodes = {run: len(training_centres(parse_run_config(overrides[run]), centres))
                  for run in runs}
    finished: dict[Run, tuple[dict[str, dict], list[Path]]] = {}
    for count, (run, reports, seconds) in enumerate(
            executed(runs, overrides, supernodes, out, args.jobs), start=1):
        finished[run] = (selected_results(run, reports), reports)
        results = [(r, *finished[r]) for r in runs if r in finished]  # in plan order
        write_tables(out, header, summarise(results, variants))
        result = finished[run][0][run.method]
        adapted = result["held_out_bn_adapted"]
        print(f"[loco] {count}/{len(runs)} {run.name}: held-out macro-F1 "
              f"{result['held_out']['macro_f1']:.3f}"
              + (f", BN-adapted {adapted['macro_f1']:.3f}" if adapted else "")
              + f" ({seconds:.0f}s)", flush=True)
    from server.comparison import render_comparison, sweep_notes

    html = render_comparison(summarise(results, variants), out, sweep_notes(header))
    print(f"[loco] tables: {out / 'loco.md'}, {out / 'loco.json'}, {html}", flush=True)
    return 0


def register_loco_command(parser: argparse.ArgumentParser) -> None:
    """Add the ``cytofed loco`` arguments."""
    parser.description = ("Leave-one-centre-out benchmark: every centre held out in turn; "
                          "writes OUT/loco.json, OUT/loco.md and OUT/comparison.html.")
    parser.add_argument("--centres", required=True, help="centres TOML file ([[centre]] list)")
    parser.add_argument("--held-out", default="all", help="'all' or comma-separated centres")
    parser.add_argument("--strategies", default="fedavg",
                        help=f"comma-separated methods: {', '.join(METHODS)}")
    parser.add_argument("--losses", default="ce", help="comma-separated losses")
    parser.add_argument("--recipe", default="",
                        help="a flat TOML file of run-config keys every run starts from, e.g. "
                             "simulations/recipes/robust.toml (--run-config and the flags "
                             "below win over it)")
    parser.add_argument("--variants", default="",
                        help="named variants of the recipe, each a row of the tables: "
                             "\"name: key=value ...; name2: key=value ...\" (a variant that "
                             "sets strategy or loss runs with those only)")
    parser.add_argument("--model", default=None,
                        help=f"timm backbone (default: the recipe's, else {RunConfig.model})")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"default: the recipe's, else {RunConfig.image_size}")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds (default: the recipe's, else {RunConfig.num_server_rounds})")
    parser.add_argument("--local-epochs", type=int, default=None,
                        help=f"default: the recipe's, else {RunConfig.local_epochs}")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..K-1 per configuration")
    parser.add_argument("--device", default=None,
                        help=f"auto, cpu or cuda (default: the recipe's, else {RunConfig.device})")
    parser.add_argument("--run-config", default="",
                        help="further run-config overrides shared by every run, as for "
                             "`flwr run --run-config`, e.g. \"pretrained='imagenet'\"")
    parser.add_argument("--reference-config", default="",
                        help="overrides for the pooled cross-entropy reference only, e.g. "
                             "plain ERM: \"field-of-view='full' augment='basic'\"")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process (they share the "
                             "device: on a GPU that small models leave mostly idle, a few at "
                             "once finish the sweep sooner)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(func=run_loco)
