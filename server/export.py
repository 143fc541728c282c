"""The run's exported model: ``model_card.json`` describing ``best.safetensors``.

Its temperature is the one the training sites' validation NLL curves picked at the end of the
run (report.json's ``calibration``), and the ``uncertain`` threshold is calibrated on the
sites' pooled validation confidence histograms at that temperature (shares per bin, sent by
each site's evaluate handler), never on held-out labels: see
``common.metrics.uncertainty_threshold``. Its input normalisation is the run's
(``common.pipeline.model_input``: the stain normalisation, the backbone's mean/std).
"""

from __future__ import annotations

from pathlib import Path

from common.losses import logit_scale
from common.metrics import confident_share, uncertainty_threshold
from common.model_input import ModelInput
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
    best, calibration = report["best"], report["calibration"]
    validation = calibration["validation"]
    uncertainty = None
    if "val_correct_by_confidence" in validation:
        uncertainty = {**uncertainty_threshold(validation["val_correct_by_confidence"],
                                               validation["val_wrong_by_confidence"]),
                       "calibrated_on": "the training sites' validation splits after round "
                                        f"{best['round']}, at temperature "
                                        f"{calibration['temperature']:.3g}"}
    inputs = ModelInput.for_backbone(config["model"], config.get("stain-normalise", "none"))
    adapted = best.get("held_out_bn_adapted")
    return ModelCard(
        classes=tuple(report["classes"]), taxonomy=taxonomy, backbone=config["model"],
        norm=config["norm"],
        preprocessing=Preprocessing(image_size=config["image-size"],
                                    field_of_view=config["field-of-view"], mean=inputs.mean,
                                    std=inputs.std,
                                    stain_normalisation=inputs.stain_normalisation),
        weights=WEIGHTS_FILE, adapt_batchnorm=adapted is not None,
        logit_scale=logit_scale(config["loss"]), temperature=calibration["temperature"],
        training_centres=tuple(report["training_centres"]),
        held_out_centre=report["held_out_centre"],
        held_out_metrics={key: best["held_out"][key] for key in HELD_OUT_KEYS},
        held_out_metrics_bn_adapted=(None if adapted is None
                                     else {key: adapted[key] for key in HELD_OUT_KEYS}),
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
