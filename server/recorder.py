"""What every run writes, whatever its method: round lines, checkpoints, weights, report, card.

A federated ServerApp (``server.app``) and a centralised reference (``simulations.baselines``:
``pooled``, ``local``) hand each completed round to one :class:`RunRecorder`, which prints the
round's progress line, checkpoints it (a restarted run resumes after it), keeps
``best.safetensors`` at the round :func:`common.selection.best_round` picks, and at the end
writes ``final.safetensors``, ``model_card.json`` and the report, with the selected model's
in-distribution test results (the training sites' test splits, aggregate counts only) beside
the held-out ones. No Flower import: a centralised run records through it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import selection
from common.config import RunConfig
from common.metrics import confusion_metrics
from common.weights import load_weights, save_weights
from server.export import applied_held_out, export_model
from server.report import write_report
from server.rundir import RunDirectory

BEST_FILE, FINAL_FILE = "best.safetensors", "final.safetensors"


@dataclass
class RoundResult:
    """What one round produced; ``held_out`` holds the server-side held-out metrics and
    ``held_out_bn_adapted`` those after test-time BatchNorm adaptation (None when not run)."""

    round: int
    train: dict[str, float]
    validation: dict
    held_out: dict
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

    def best_state(self) -> dict[str, np.ndarray]:
        """The weights of the selected round (``best.safetensors``)."""
        return load_weights(self.path / BEST_FILE)[0]

    def finish(self, final: dict[str, np.ndarray], test_reports: Sequence[dict],
               extras: dict | None = None) -> Path:
        """Write ``final.safetensors``, the model card and the report; returns report.json.

        ``test_reports``: the training sites' reports on their test splits for the selected
        weights (:meth:`best_state`); ``extras``: further report sections (``privacy``).
        """
        save_weights(self.path / FINAL_FILE, final, self.metadata)
        report = self.report(test_reports, extras or {})
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
        print(f"[cytofed] report: {path}", flush=True)
        self.run.save_progress(self.rounds, finished=True)
        return path

    def report(self, test_reports: Sequence[dict], extras: dict) -> dict:
        """report.json's content (see the README); the best round is the exported model."""
        best = selection.best_round(self.rounds)
        in_distribution = in_distribution_test(test_reports, self.classes)
        gap = (in_distribution["macro_f1"] - applied_held_out(best)["macro_f1"]
               if in_distribution else None)
        return {
            "run_name": self.config.run_name, "run_dir": str(self.path),
            "config": self.config.to_dict(), "classes": list(self.classes),
            "held_out_centre": self.config.held_out, "training_centres": self.training_centres,
            "rounds": self.rounds, "held_out_data": self.held_out_data,
            "final": {"round": self.rounds[-1]["round"], **_held_out_results(self.rounds[-1])},
            "best": {"round": best["round"], "selected_by": selection.SELECTED_BY,
                     **_held_out_results(best), "in_distribution_test": in_distribution,
                     "id_ood_gap": gap},
            "held_out_macro_f1": self.rounds[-1]["held_out"]["macro_f1"],
            **extras,
        }


def _held_out_results(round_result: dict) -> dict:
    """Plain and test-time-BN-adapted held-out metrics of a round (the latter may be None)."""
    return {"held_out": round_result["held_out"],
            "held_out_bn_adapted": round_result.get("held_out_bn_adapted")}


def progress_line(record: dict, num_rounds: int) -> str:
    """The line a run prints when a round ends."""
    adapted = record.get("held_out_bn_adapted")
    return (f"[cytofed] round {record['round']}/{num_rounds}: "
            f"train loss {record['train'].get('train_loss', float('nan')):.4f}, "
            f"sites' val macro-F1 {record['validation'].get('val_macro_f1', float('nan')):.3f}, "
            f"held-out macro-F1 {record['held_out']['macro_f1']:.3f}"
            + (f" (BN-adapted {adapted['macro_f1']:.3f})" if adapted else "")
            + f" ({record['replied']}/{record['sampled']} sites, {record['seconds']:.1f}s)")
