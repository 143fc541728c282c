"""Model card round trip, loading an exported model without Flower, and the uncertain threshold."""

import json
import re

import numpy as np
import pytest
import torch

from common import modelcard
from common.metrics import confident_share, uncertainty_threshold
from common.modelcard import CARD_FILE, ModelCard, load_exported_model, read_model_card
from server.export import model_card
from tests.exported_model import export_tiny_model, tiny_card


def test_card_round_trips(tmp_path):
    _, path = export_tiny_model(tmp_path)
    card = read_model_card(path)
    assert card == tiny_card()
    assert isinstance(card.classes, tuple) and isinstance(card.preprocessing.mean, tuple)
    assert card.held_out_metrics["per_class_f1"] == {"basophil": None}
    assert ModelCard.from_dict(json.loads(path.read_text())) == card


@pytest.mark.parametrize("target", ["card", "directory", "weights"])
def test_exported_model_gives_identical_logits(tmp_path, target):
    model, card_path = export_tiny_model(tmp_path / "run")
    path = {"card": card_path, "directory": tmp_path / "run",
            "weights": tmp_path / "run" / "best.safetensors"}[target]
    loaded, card = load_exported_model(path)
    inputs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))
    assert card.classes == tiny_card().classes and not loaded.training


def test_an_ldam_run_exports_its_logit_scale_and_applies_it(tmp_path):
    model, _ = export_tiny_model(tmp_path / "run", logit_scale=30.0)
    loaded, card = load_exported_model(tmp_path / "run")
    inputs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), 30.0 * model(inputs))
    assert card.logit_scale == 30.0
    report = {"config": {"model": "test_resnet", "norm": "batch", "image-size": 32,
                         "field-of-view": "full", "strategy": "fedavg", "loss": "ldam_drw",
                         "num-server-rounds": 1},
              "classes": ["neutrophil"], "training_centres": ["a"], "held_out_centre": "c",
              "rounds": [_round(1, {}, HELD_OUT)],
              "best": {"round": 1, "selected_by": "rule", **_round(1, {}, HELD_OUT)},
              "calibration": {"temperature": 1.0, "validation": {}}}
    assert model_card(report, "wbc5").logit_scale == 30.0
    assert model_card({**report, "config": {**report["config"], "loss": "focal"}},
                      "wbc5").logit_scale == 1.0


def test_foreign_or_mismatched_cards_are_refused(tmp_path):
    (tmp_path / CARD_FILE).write_text(json.dumps({"classes": ["a"]}))
    with pytest.raises(ValueError, match="not a cytofed model card"):
        read_model_card(tmp_path / CARD_FILE)
    card = tiny_card()
    stale = {**card.to_dict(), "preprocessing": {**card.to_dict()["preprocessing"],
                                                 "decoder_version": 0}}
    export_tiny_model(tmp_path / "stale")
    (tmp_path / "stale" / CARD_FILE).write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="image decoder v0"):
        load_exported_model(tmp_path / "stale")


def test_threshold_is_the_smallest_edge_meeting_the_target_error():
    correct, wrong = [0, 2, 3, 10], [0, 2, 1, 0]  # 4 bins: [0, .25), [.25, .5), ...
    assert uncertainty_threshold(correct, wrong, 0.05) == pytest.approx(
        {"threshold": 0.75, "target_error": 0.05, "coverage": 10 / 18, "error_rate": 0.0})
    assert uncertainty_threshold(correct, wrong, 0.1)["threshold"] == 0.5
    assert uncertainty_threshold(correct, wrong, 0.2)["threshold"] == 0.0
    never = uncertainty_threshold([0, 0, 0, 1], [0, 0, 0, 1])
    assert never["threshold"] == 1.0 and never["coverage"] == 0 and never["error_rate"] is None


def test_example_weighted_shares_equal_pooled_counts():
    """Sites send shares of their validation images; Flower's example-weighted average of
    them is the pooled histogram, so the threshold is the one of the pooled counts."""
    sites = [(np.array([0, 5, 9, 30]), np.array([1, 4, 2, 1])),
             (np.array([0, 1, 2, 50]), np.array([0, 3, 1, 0]))]
    sizes = [c.sum() + w.sum() for c, w in sites]
    weights = np.array(sizes) / sum(sizes)
    shares = [sum(wt * part / n for wt, n, part in zip(weights, sizes, parts, strict=True))
              for parts in zip(*sites, strict=True)]
    pooled = [sum(parts) for parts in zip(*sites, strict=True)]
    assert uncertainty_threshold(*shares) == pytest.approx(uncertainty_threshold(*pooled))
    assert confident_share(*shares, 0.5) == pytest.approx(confident_share(*pooled, 0.5))


def _round(number, validation, held_out, adapted=None):
    return {"round": number, "validation": validation, "held_out": held_out,
            "held_out_bn_adapted": adapted}


HELD_OUT = {"macro_f1": 0.4, "balanced_accuracy": 0.5, "accuracy": 0.6, "ece": 0.1,
            "num_examples": 10, "per_class_f1": {"neutrophil": 0.4}, "loss": 1.0}


def test_run_export_card_uses_best_round_and_sites_validation_at_the_temperature():
    """The card describes the selected round at the federated temperature: its threshold
    comes from the sites' validation histograms at that temperature (not the round's at 1),
    plain and BN-adapted held-out metrics are kept apart, adaptation is only recommended."""
    held_out = HELD_OUT
    adapted = {**held_out, "macro_f1": 0.7}
    at_one = {"val_macro_f1": 0.8, "val_correct_by_confidence": [0.5, 0.2, 0.0],
              "val_wrong_by_confidence": [0.2, 0.1, 0.0]}
    at_temperature = {"val_macro_f1": 0.8, "val_correct_by_confidence": [0.0, 0.2, 0.7],
                      "val_wrong_by_confidence": [0.0, 0.1, 0.0]}
    report = {
        "config": {"model": "tf_efficientnet_lite0", "norm": "group", "image-size": 32,
                   "field-of-view": "cell", "stain-normalise": "reinhard", "strategy": "fedbn",
                   "loss": "focal", "num-server-rounds": 2},
        "classes": ["neutrophil"], "training_centres": ["a", "b"], "held_out_centre": "c",
        "rounds": [_round(1, {"val_macro_f1": 0.1}, held_out),
                   _round(2, at_one, held_out, adapted)],
        "best": {"round": 2, "selected_by": "sites' validation macro-F1", "temperature": 0.8,
                 "held_out": held_out, "held_out_bn_adapted": adapted},
        "calibration": {"temperature": 0.8, "validation": at_temperature},
    }
    card = model_card(report, "wbc5")
    assert card.temperature == 0.8
    assert card.threshold == pytest.approx(2 / 3)
    assert card.uncertainty["coverage"] == pytest.approx(0.7 / 1.0)
    assert "temperature 0.8" in card.uncertainty["calibrated_on"]
    assert card.adapt_batchnorm
    assert card.held_out_metrics["macro_f1"] == 0.4
    assert card.held_out_metrics_bn_adapted["macro_f1"] == 0.7
    assert "loss" not in card.held_out_metrics
    assert (card.backbone, card.norm, card.preprocessing.field_of_view) == (
        "tf_efficientnet_lite0", "group", "cell")
    # The backbone's own input normalisation (timm: [-1, 1] for this port), not ImageNet's.
    assert card.preprocessing.mean == card.preprocessing.std == (0.5, 0.5, 0.5)
    assert card.preprocessing.stain_normalisation == "reinhard"
    assert card.training["round"] == 2 and card.training_centres == ("a", "b")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", 0, "'temperature': expected a number in"),
    ("temperature", "1", "'temperature': expected a number in"),
    ("stain_normalisation", "macenko", "'stain_normalisation': expected one of"),
    ("mean", [0.5, 0.5], "'mean': expected 3 finite numbers"),
    ("std", [0.5, 0.0, 0.5], "'std': expected 3 finite positive numbers"),
])
def test_a_card_with_an_unknown_input_or_temperature_is_refused(tmp_path, field, value, message):
    _, card_path = export_tiny_model(tmp_path / "run")
    data = tiny_card().to_dict()
    if field == "temperature":
        data[field] = value
    else:
        data["preprocessing"][field] = value
    card_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"{card_path}: model card ") + ".*"
                       + re.escape(message)):
        load_exported_model(card_path)


def test_a_card_from_before_input_normalisation_followed_the_backbone_still_loads(tmp_path):
    """Older cards have ImageNet mean/std and no stain normalisation or temperature."""
    _, card_path = export_tiny_model(tmp_path / "run")
    data = tiny_card().to_dict()
    del data["temperature"], data["held_out_metrics_bn_adapted"]
    del data["preprocessing"]["stain_normalisation"]
    card_path.write_text(json.dumps(data))
    _, card = load_exported_model(card_path)
    assert card.temperature == 1.0 and card.preprocessing.stain_normalisation == "none"
    assert card.preprocessing.model_input().mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("weights", ["../../etc/x", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_a_card_cannot_point_its_weights_outside_its_folder(tmp_path, weights):
    _, card_path = export_tiny_model(tmp_path / "run")
    card_path.write_text(json.dumps({**tiny_card().to_dict(), "weights": weights}))
    with pytest.raises(ValueError, match=re.escape(
            f"{card_path}: model card field 'weights': expected a file name inside the card's")):
        load_exported_model(card_path)


def test_a_weights_link_leading_outside_the_folder_is_refused(tmp_path):
    export_tiny_model(tmp_path / "elsewhere")
    export_tiny_model(tmp_path / "run", weights="linked.safetensors")
    (tmp_path / "run" / "linked.safetensors").unlink()
    (tmp_path / "run" / "linked.safetensors").symlink_to(
        tmp_path / "elsewhere" / "best.safetensors")
    with pytest.raises(ValueError, match=r"'weights' 'linked\.safetensors' leads outside"):
        load_exported_model(tmp_path / "run")


def test_oversized_cards_weights_and_image_sizes_are_refused(tmp_path, monkeypatch):
    _, card_path = export_tiny_model(tmp_path / "run")
    monkeypatch.setattr(modelcard, "MAX_CARD_BYTES", 100)
    with pytest.raises(ValueError, match=r"model card .* more than the 100 a model card"):
        read_model_card(card_path)
    monkeypatch.undo()
    monkeypatch.setattr(modelcard, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(ValueError, match=r"weights file .*best.safetensors is \d+ bytes"):
        load_exported_model(card_path)
    monkeypatch.undo()
    huge = tiny_card().to_dict()
    huge["preprocessing"]["image_size"] = 10**6
    card_path.write_text(json.dumps(huge))
    with pytest.raises(ValueError, match=r"'preprocessing\.image_size': expected an integer"):
        read_model_card(card_path)
    card_path.write_text("[" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        read_model_card(card_path)
