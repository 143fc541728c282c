"""The exported model: safetensors weights plus a model card JSON that says how to use them.

The card holds everything needed to rebuild and apply the model without Flower and without
the training config: the taxonomy's classes, the backbone and its normalisation layers, the
preprocessing (see ``common.imagecache``: square padding with the border's median colour,
Lanczos resize, full image or cell-centred crop; then the stain normalisation and the
backbone's mean/std, see ``common.model_input``), the temperature that divides the logits
(federated temperature scaling, ``common.calibration``), the training and held-out centres,
the held-out metrics and the ``uncertain`` threshold calibrated on the training sites'
validation data at that temperature (see ``common.metrics.uncertainty_threshold``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from torch import nn

from common.augment import IMAGENET_MEAN, IMAGENET_STD
from common.imagecache import CACHE_VERSION, MODES
from common.model_input import ModelInput
from common.models import create_model
from common.weights import load_state, load_weights

CARD_FILE = "model_card.json"
CARD_FORMAT = "cytofed-model-card/1"
# Bounds on what a card may make this program read or build (a card may come from elsewhere).
MAX_CARD_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 2 << 30
MAX_CLASSES = 1000
MAX_IMAGE_SIZE = 1024
MAX_TEMPERATURE = 100.0
PADDING = "pad to a square with the median colour of the image border, then Lanczos resize"


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the model's input (cards written before ``mean``/``std``
    followed the backbone and before ``stain_normalisation`` mean ImageNet's and none)."""

    image_size: int
    field_of_view: str = "full"  # one of common.imagecache.MODES
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    stain_normalisation: str = "none"  # common.model_input.STAIN_NORMALISATIONS
    padding: str = PADDING
    decoder_version: int = CACHE_VERSION  # common.imagecache.CACHE_VERSION it was trained with

    def model_input(self) -> ModelInput:
        """What the decoded images go through before the model (``common.model_input``)."""
        return ModelInput(self.mean, self.std, self.stain_normalisation)


@dataclass(frozen=True)
class ModelCard:
    """What an exported model is, how it was trained and how it should be applied.

    ``weights`` is the safetensors file, relative to the card and inside its folder.
    ``adapt_batchnorm`` (FedBN, ``test-time-bn``) recommends re-estimating BatchNorm
    statistics on the scored images (``cytofed predict/evaluate --adapt``; never done
    unasked). ``logit_scale`` multiplies the classifier's logits, as in training (LDAM's s;
    see ``common.models.ScaledClassifier``); every probability is ``softmax(logits /
    temperature)``. ``held_out_metrics`` are plain, ``held_out_metrics_bn_adapted`` after
    adaptation (None when not measured). ``uncertainty`` is the output of
    ``common.metrics.uncertainty_threshold`` at ``temperature``, or None.
    """

    classes: tuple[str, ...]
    taxonomy: str
    backbone: str
    norm: str
    preprocessing: Preprocessing
    weights: str = "best.safetensors"
    adapt_batchnorm: bool = False
    logit_scale: float = 1.0
    temperature: float = 1.0
    training_centres: tuple[str, ...] = ()
    held_out_centre: str | None = None
    held_out_metrics: dict[str, Any] = field(default_factory=dict)
    held_out_metrics_bn_adapted: dict[str, Any] | None = None
    uncertainty: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)  # strategy, loss, rounds, round used

    @property
    def threshold(self) -> float | None:
        """Confidence below which a prediction is flagged ``uncertain`` (None: not calibrated)."""
        return None if self.uncertainty is None else self.uncertainty["threshold"]

    def to_dict(self) -> dict[str, Any]:
        return {"format": CARD_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Inverse of :meth:`to_dict`; raises ValueError naming what is wrong."""
        if data.get("format") != CARD_FORMAT:
            raise ValueError(f"not a cytofed model card (format {data.get('format')!r}, "
                             f"expected {CARD_FORMAT!r})")
        values = {k: v for k, v in data.items() if k != "format"}
        try:
            steps = dict(values.pop("preprocessing"))
            preprocessing = Preprocessing(**{**steps, "mean": tuple(steps["mean"]),
                                             "std": tuple(steps["std"])})
            card = cls(**{**values, "preprocessing": preprocessing,
                          "classes": tuple(values["classes"]),
                          "training_centres": tuple(values.get("training_centres", ()))})
        except (KeyError, TypeError) as error:
            raise ValueError(f"model card is missing or has an unknown field: {error}") from error
        if preprocessing.field_of_view not in MODES:
            raise ValueError(f"model card: unknown field of view {preprocessing.field_of_view!r}")
        try:
            preprocessing.model_input()
        except ValueError as error:
            raise ValueError(f"model card field 'preprocessing': {error}") from error
        _check_bounds(card)
        return card


def _check_bounds(card: ModelCard) -> None:
    """Raise ValueError naming the field when a card asks for more than it should."""
    classes, size, weights = card.classes, card.preprocessing.image_size, card.weights
    if not 0 < len(classes) <= MAX_CLASSES or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"model card field 'classes': expected 1 to {MAX_CLASSES} class names")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_IMAGE_SIZE:
        raise ValueError(f"model card field 'preprocessing.image_size': expected an integer "
                         f"from 1 to {MAX_IMAGE_SIZE}, got {size!r}")
    temperature = card.temperature
    if (isinstance(temperature, bool) or not isinstance(temperature, int | float)
            or not math.isfinite(temperature) or not 0 < temperature <= MAX_TEMPERATURE):
        raise ValueError(f"model card field 'temperature': expected a number in (0, "
                         f"{MAX_TEMPERATURE:g}], got {temperature!r}")
    relative = PurePosixPath(weights) if isinstance(weights, str) and weights else None
    if relative is None or relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"model card field 'weights': expected a file name inside the card's "
                         f"folder, got {weights!r}")


def write_model_card(path: Path, card: ModelCard) -> Path:
    """Write ``card`` as JSON to ``path``."""
    path = Path(path)
    path.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return path


def read_model_card(path: Path) -> ModelCard:
    """The card at ``path``; raises ValueError naming the file when it is not a usable card."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model card {path} does not exist")
    _check_size(path, MAX_CARD_BYTES, "model card")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a cytofed model card (a JSON object is expected)")
    try:
        return ModelCard.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _check_size(path: Path, limit: int, what: str) -> None:
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{what} {path} is {size} bytes, more than the {limit} a {what} may "
                         "have")


def find_model_card(path: Path) -> Path:
    """The card of ``path``: the card itself, a run directory's, or a weights file's sibling.

    Errors name ``path`` as given, and what was expected there.
    """
    path = Path(path)
    expected = f"a run directory, its {CARD_FILE} or a weights file beside the card"
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (expected {expected})")
    if path.is_dir():
        card = path / CARD_FILE
        if not card.is_file():
            raise FileNotFoundError(f"model {path}: the directory holds no {CARD_FILE} "
                                    f"(expected {expected}; an unfinished run has none)")
        return card
    if path.suffix == ".json":
        return path
    card = path.with_name(CARD_FILE)
    if not card.is_file():
        raise FileNotFoundError(f"model {path}: no {CARD_FILE} beside this file "
                                f"(expected {expected})")
    return card


def weights_path(card_path: Path, card: ModelCard) -> Path:
    """The card's weights file, which must lie in the card's folder (links resolved)."""
    folder = Path(card_path).resolve().parent
    path = (folder / card.weights).resolve()
    if not path.is_relative_to(folder):
        raise ValueError(f"{card_path}: field 'weights' {card.weights!r} leads outside the "
                         f"card's folder {folder}")
    return path


def load_exported_model(path: Path) -> tuple[nn.Module, ModelCard]:
    """The model (eval mode, on the CPU) and card of a card, run directory or weights file.

    Given a weights file, that file is loaded with its sibling card's description.
    """
    card_path = find_model_card(path)
    card = read_model_card(card_path)
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else weights_path(card_path, card)
    steps = card.preprocessing
    if steps.decoder_version != CACHE_VERSION:
        raise ValueError(f"{card_path}: trained with image decoder v{steps.decoder_version}; "
                         f"this version decodes as v{CACHE_VERSION}, so predictions would not "
                         "match training")
    if weights.is_file():
        _check_size(weights, MAX_WEIGHTS_BYTES, "weights file")
    model = create_model(card.backbone, len(card.classes), pretrained="", norm=card.norm,
                         logit_scale=card.logit_scale)
    state, _ = load_weights(weights)
    load_state(model, state)
    return model.eval(), card
