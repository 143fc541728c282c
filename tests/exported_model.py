"""A tiny "trained" exported model (test_resnet, 32 px) written straight into a folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from common.modelcard import CARD_FILE, ModelCard, Preprocessing, write_model_card
from common.models import create_model
from common.taxonomy import TAXONOMIES
from common.weights import model_state, save_weights

IMAGE_SIZE = 32


def tiny_card(**changes) -> ModelCard:
    """A complete card for a wbc5 test_resnet at 32 px."""
    card = ModelCard(
        classes=TAXONOMIES["wbc5"], taxonomy="wbc5", backbone="test_resnet", norm="batch",
        preprocessing=Preprocessing(image_size=IMAGE_SIZE), weights="best.safetensors",
        training_centres=("clinic-a", "clinic-b"), held_out_centre="clinic-c",
        held_out_metrics={"macro_f1": 0.5, "per_class_f1": {"basophil": None}},
        uncertainty={"threshold": 0.35, "target_error": 0.05, "coverage": 0.6,
                     "error_rate": 0.04, "calibrated_on": "test"},
        training={"strategy": "fedavg", "round": 3})
    return dataclasses.replace(card, **changes)


def export_tiny_model(directory: Path, **card_changes) -> tuple[nn.Module, Path]:
    """Random-but-fixed weights and their card in ``directory``; returns (model, card path)."""
    torch.manual_seed(0)
    model = create_model("test_resnet", len(TAXONOMIES["wbc5"]), norm="batch").eval()
    directory.mkdir(parents=True, exist_ok=True)
    card = tiny_card(**card_changes)
    save_weights(directory / card.weights, model_state(model))
    return model, write_model_card(directory / CARD_FILE, card)
