"""The run's exported model: ``model_card.json`` describing ``best.safetensors``.

The ``uncertain`` threshold is calibrated on the best round's pooled validation confidence
histograms of the training sites (shares per bin, sent by each site's evaluate handler), never
on held-out labels: see ``common.metrics.uncertainty_threshold``.
"""

from __future__ import annotations

from pathlib import Path

from common.losses import logit_scale
from common.metrics import confident_share, uncertainty_threshold
from common.modelcard import CARD_FILE, ModelCard, Preprocessing, write_model_card

WEIGHTS_FILE = "best.safetensors"
HELD_OUT_KEYS = ("macro_f1", "balanced_accuracy", "accuracy", "ece", "num_examples",
                 "per_class_f1")


def applied_held_out(result: dict) -> dict:
    """The held-out metrics of a round as the exported model is applied: after test-time
    BatchNorm adaptation when the run asked for it (always under FedBN), else plain."""
    return result.get("held_out_bn_adapted") or result["held_out"]


def model_card(report: dict, taxonomy: str) -> ModelCard:
    """The card of the best round's weights of a run report (see ``server.recorder``)."""
    config = report["config"]
    best = next(r for r in report["rounds"] if r["round"] == report["best"]["round"])
    validation = best["validation"]
    uncertainty = None
    if "val_correct_by_confidence" in validation:
        uncertainty = {**uncertainty_threshold(validation["val_correct_by_confidence"],
                                               validation["val_wrong_by_confidence"]),
                       "calibrated_on": "the training sites' validation splits after round "
                                        f"{best['round']}"}
    held_out = applied_held_out(best)
    return ModelCard(
        classes=tuple(report["classes"]), taxonomy=taxonomy, backbone=config["model"],
        norm=config["norm"],
        preprocessing=Preprocessing(image_size=config["image-size"],
                                    field_of_view=config["field-of-view"]),
        weights=WEIGHTS_FILE, adapt_batchnorm=best.get("held_out_bn_adapted") is not None,
        logit_scale=logit_scale(config["loss"]),
        training_centres=tuple(report["training_centres"]),
        held_out_centre=report["held_out_centre"],
        held_out_metrics={key: held_out[key] for key in HELD_OUT_KEYS},
        uncertainty=uncertainty,
        training={"strategy": config["strategy"], "loss": config["loss"],
                  "rounds": config["num-server-rounds"], "round": best["round"],
                  "selected_by": report["best"]["selected_by"]})


def export_model(run_dir: Path, report: dict, taxonomy: str) -> dict:
    """Write ``model_card.json`` beside ``best.safetensors``; returns the report's model entry
    (files, threshold, and the held-out coverage and error rate at that threshold)."""
    card = model_card(report, taxonomy)
    write_model_card(run_dir / CARD_FILE, card)
    entry = {"card": CARD_FILE, "weights": card.weights, "uncertainty": card.uncertainty}
    if card.threshold is not None:
        histogram = applied_held_out(report["best"])["confidence_histogram"]
        entry["held_out_at_threshold"] = confident_share(histogram["correct"],
                                                         histogram["wrong"], card.threshold)
    return entry
