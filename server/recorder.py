"""What every run writes, whatever its method: round lines, checkpoints, weights, report, card.

A federated ServerApp (``server.app``) and a centralised reference (``simulations.baselines``:
``pooled``, ``local``) hand each completed round to one :class:`RunRecorder`, which prints the
round's progress line, checkpoints it (a restarted run resumes after it), keeps
``best.safetensors`` at the round :func:`common.selection.best_round` picks, and at the end
writes ``final.safetensors``, ``model_card.json`` and the report from the :class:`EndOfRun`:
the selected model at the temperature picked from the training sites' validation NLL curves
(federated temperature scaling), its in-distribution test results (the training sites' test
splits, aggregate counts only) and its held-out results at that temperature. No Flower
import: a centralised run records through it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import selection
from common.calibration import TEMPERATURES, NllCurve, pooled_nll
from common.config import RunConfig
from common.metrics import confusion_metrics
from common.weights import load_weights, save_weights
from server.export import applied_held_out, export_model
from server.report import write_report
from server.rundir import RunDirectory

BEST_FILE, FINAL_FILE = "best.safetensors", "final.safetensors"
TEMPERATURE_SELECTED_BY = (f"the training sites' validation NLL summed over {len(TEMPERATURES)} "
                           f"temperatures from {TEMPERATURES[0]:g} to {TEMPERATURES[-1]:g} "
                           "(federated temperature scaling)")


@dataclass
class RoundResult:
    """What one round produced; ``held_out`` holds the server-side held-out metrics and
    ``held_out_bn_adapted`` those after test-time BatchNorm adaptation (None when not run;
    both None in a round that did not score the held-out centre, see ``held-out-every``)."""

    round: int
    train: dict[str, float]
    validation: dict
    held_out: dict | None
    seconds: float
    sampled: int
    replied: int
    clients: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    held_out_bn_adapted: dict | None = None
    site_eval_seconds: list[float] = field(default_factory=list)  # each site's validation
    held_out_seconds: float = 0.0  # the server's held-out evaluation

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class EndOfRun:
    """The selected model at temperature ``temperature``: what the run exports and reports.

    ``curves``: each training centre's validation NLL curve (by centre; ``temperature`` is
    their pooled optimum, 1 without any); ``validation`` and ``test``: the training sites'
    ``common.selection.site_report``s at ``temperature``, each with its ``centre``;
    ``held_out``: ``common.pipeline.score_held_out`` at ``temperature``; ``left_out``: sites
    whose curve was not used, and why.
    """

    temperature: float
    curves: dict[str, NllCurve]
    validation: list[dict]
    test: list[dict]
    held_out: dict[str, dict | None]
    left_out: list[dict] = field(default_factory=list)


def calibration_entry(end: EndOfRun, best: dict) -> dict:
    """report.json's ``calibration``: the temperature, who chose it, the pooled validation NLL
    at it and at 1 (the selected round's), and the pooled validation report at it (the
    sites' reports checked by ``server.replies``)."""
    reports = [{k: v for k, v in r.items() if k != "centre"} for r in end.validation]
    return {"temperature": end.temperature, "selected_by": TEMPERATURE_SELECTED_BY,
            "sites": sorted(end.curves), "left_out": end.left_out,
            "validation_nll": (pooled_nll(list(end.curves.values()), end.temperature)
                               if end.curves else None),
            "validation_nll_at_1": best["validation"].get("val_loss"),
            "validation": selection.combine_site_reports(reports)}


def in_distribution_test(reports: Sequence[dict], classes: Sequence[str]) -> dict | None:
    """The selected model on the training sites' test splits: metrics of their summed
    confusion counts, plus each site's macro-F1 and images, by centre name (None when no site
    scored an image).

    ``reports`` are sites' checked ``common.selection.site_report``s for the ``test`` split
    (``server.replies``), each with its ``centre``.
    """
    counts = {r["centre"]: {k: v for k, v in r.items() if k != "centre"} for r in reports}
    scored = {centre: r for centre, r in sorted(counts.items()) if r[selection.WEIGHT_KEY] > 0}
    if not scored:
        return None
    summed = selection.combine_site_reports(list(scored.values()))
    return {**confusion_metrics(selection.square(summed["test_confusion_matrix"]), classes),
            "loss": summed.get("test_loss"),
            "sites": [{"centre": centre,
                       "macro_f1": selection.macro_f1(r["test_confusion_matrix"]),
                       "num_examples": r[selection.WEIGHT_KEY]} for centre, r in scored.items()]}


class RunRecorder:
    """The run directory ``<output-dir>/<time>-<run-name>/`` of one run and its rounds so far.

    Opening resumes the newest unfinished run with the same name and config: ``checkpoint``
    (the weights after round ``completed``, None for a new run) and ``rounds`` (recorded).
    """

    def __init__(self, config: RunConfig, classes: Sequence[str], taxonomy: str,
                 training_centres: Sequence[str], run_name: str | None = None,
                 held_out_data: dict[str, int] | None = None) -> None:
        self.config = config
        self.held_out_data = dict(held_out_data or {})
        self.classes = tuple(classes)
        self.taxonomy = taxonomy
        self.training_centres = list(training_centres)
        self.run = RunDirectory.open(Path(config.output_dir), run_name or config.run_name,
                                     config.to_dict())
        self.checkpoint, self.rounds, self.completed = self.run.resume()
        self.metadata = {"config": config.to_dict(), "classes": list(self.classes)}

    @property
    def path(self) -> Path:
        return self.run.path

    def complete_round(self, record: dict, state: dict[str, np.ndarray],
                       exported: dict[str, np.ndarray]) -> None:
        """Record a finished round (a :class:`RoundResult` as a dict): ``state`` is what the
        next round trains from (the checkpoint), ``exported`` the model it scored."""
        self.rounds.append(record)
        if selection.best_round(self.rounds) is record:
            save_weights(self.path / BEST_FILE, exported,
                         {**self.metadata, "round": record["round"]})
        self.run.complete_round(self.rounds, state)
        self.completed = record["round"]
        print(progress_line(record, self.config.num_server_rounds), flush=True)

    @property
    def best_round(self) -> int:
        """The round the selection rule picks so far."""
        return selection.best_round(self.rounds)["round"]
    def scores_held_out(self, server_round: int, validation: dict | None = None) -> bool:
        """Whether round ``server_round`` scores the held-out centre: every ``held-out-every``
        rounds, at the last round and, given the round's ``validation``, when that makes it
        the selected round so far (so the exported model always has a held-out score)."""
        if (server_round % self.config.held_out_every == 0
                or server_round == self.config.num_server_rounds):
            return True
        if validation is None:
            return False
        candidate = {"round": server_round, "validation": validation}
        return selection.best_round([*self.rounds, candidate]) is candidate

    def best_state(self) -> dict[str, np.ndarray]:
        """The weights of the selected round (``best.safetensors``)."""
        return load_weights(self.path / BEST_FILE)[0]

    def finish(self, final: dict[str, np.ndarray], end: EndOfRun,
               extras: dict | None = None) -> Path:
        """Write ``final.safetensors``, the model card and the report; returns report.json.

        ``end``: the selected weights (:meth:`best_state`) at the federated temperature;
        ``extras``: further report sections (``privacy``).
        """
        save_weights(self.path / FINAL_FILE, final, self.metadata)
        report = self.report(end, extras or {})
        report["model"] = export_model(self.path, report, self.taxonomy)
        path = write_report(self.path, report)
        held_out, best = report["final"]["held_out"], report["best"]
        print(f"[cytofed] held-out centre {self.config.held_out}: macro-F1 "
              f"{held_out['macro_f1']:.3f}, balanced accuracy "
              f"{held_out['balanced_accuracy']:.3f}", flush=True)
        if best["in_distribution_test"]:
            print(f"[cytofed] selected round {best['round']}: in-distribution test macro-F1 "
                  f"{best['in_distribution_test']['macro_f1']:.3f}, held-out "
                  f"{applied_held_out(best)['macro_f1']:.3f} (gap {best['id_ood_gap']:.3f})",
                  flush=True)
        print(calibration_line(report), flush=True)
        print(f"[cytofed] report: {path}", flush=True)
        self.run.save_progress(self.rounds, finished=True)
        return path

    def report(self, end: EndOfRun, extras: dict) -> dict:
        """report.json's content (see the README); the best round is the exported model,
        whose held-out results are at the federated temperature (the rounds' at 1)."""
        best = selection.best_round(self.rounds)
        in_distribution = in_distribution_test(end.test, self.classes)
        gap = (in_distribution["macro_f1"] - applied_held_out(end.held_out)["macro_f1"]
               if in_distribution else None)
        return {
            "run_name": self.config.run_name, "run_dir": str(self.path),
            "config": self.config.to_dict(), "classes": list(self.classes),
            "held_out_centre": self.config.held_out, "training_centres": self.training_centres,
            "rounds": self.rounds, "held_out_data": self.held_out_data,
            "final": {"round": self.rounds[-1]["round"], **_held_out_results(self.rounds[-1])},
            "best": {"round": best["round"], "selected_by": selection.SELECTED_BY,
                     "temperature": end.temperature, **_held_out_results(end.held_out),
                     "in_distribution_test": in_distribution, "id_ood_gap": gap},
            "calibration": calibration_entry(end, best),
            "held_out_macro_f1": self.rounds[-1]["held_out"]["macro_f1"],
            **extras,
        }


def _held_out_results(round_result: dict) -> dict:
    """Plain and test-time-BN-adapted held-out metrics of a round (the latter may be None)."""
    return {"held_out": round_result["held_out"],
            "held_out_bn_adapted": round_result.get("held_out_bn_adapted")}


def calibration_line(report: dict) -> str:
    """The line a run prints about its temperature and ``uncertain`` threshold."""
    calibration, model = report["calibration"], report["model"]
    line = (f"[cytofed] temperature {calibration['temperature']:.3f} from "
            f"{len(calibration['sites'])} sites' validation NLL curves")
    uncertainty = model.get("uncertainty")
    if uncertainty is None:
        return line + "; no uncertainty threshold (no site's validation histogram)"
    line += (f"; uncertain below {uncertainty['threshold']:.2f}: coverage "
             f"{uncertainty['coverage']:.3f} of the sites' validation images")
    held_out = model.get("held_out_at_threshold")
    if held_out:
        error = "n/a" if held_out["error_rate"] is None else f"{held_out['error_rate']:.3f}"
        line += f", {held_out['coverage']:.3f} of the held-out centre's (error rate {error})"
    return line


def progress_line(record: dict, num_rounds: int) -> str:
    """The line a run prints when a round ends."""
    adapted = record.get("held_out_bn_adapted")
    held_out = (f"held-out macro-F1 {record['held_out']['macro_f1']:.3f}" if record["held_out"]
                else "held-out not scored this round")
    return (f"[cytofed] round {record['round']}/{num_rounds}: "
            f"train loss {record['train'].get('train_loss', float('nan')):.4f}, "
            f"sites' val macro-F1 "
            f"{record['validation'].get(selection.SELECTION_KEY, float('nan')):.3f}, "
            + held_out + (f" (BN-adapted {adapted['macro_f1']:.3f})" if adapted else "")
            + f" ({record['replied']}/{record['sampled']} sites, {record['seconds']:.1f}s)")
