"""How a decoded image becomes the model's input, identically on every path.

Two steps, each in one place:

1. stain normalisation (run config ``stain-normalise``, ``common.stain.build_stain_normaliser``)
   once on the uint8 images when they are placed for a model: a site's splits, the held-out
   centre, the BatchNorm adaptation set, a chunk of ``cytofed evaluate/predict``.
   :meth:`ModelInput.place` is the only function that applies it; it takes decoded host images
   (numpy), so a placed tensor cannot be normalised a second time, and every scoring, training
   and adaptation function takes placed images;
2. per batch, the backbone's own mean/std (timm's ``pretrained_cfg``: ImageNet's for ResNet,
   0.5/0.5, that is [-1, 1], for ``tf_efficientnet_lite0``): :meth:`ModelInput.normalise`
   (evaluation, prediction, adaptation) and the training augmenter built with the same numbers.

The model card records both (``common.modelcard.Preprocessing``), so an exported model is
applied as it was trained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg

from common.augment import to_model_input
from common.stain import STAIN_NORMALISERS, build_stain_normaliser
from common.train import images_on_device

STAIN_NORMALISATIONS = ("none", *STAIN_NORMALISERS)
NORMALISE_CHUNK = 256  # images stain-normalised at a time when placed


def backbone_mean_std(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std the backbone's pretrained weights expect (timm's
    ``pretrained_cfg``; ImageNet's when timm has none for it)."""
    cfg = get_pretrained_cfg(backbone)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


@dataclass(frozen=True)
class ModelInput:
    """Stain normalisation and per-channel mean/std of one model's input (see the module
    docstring); raises ValueError naming the field that is out of range."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    stain_normalisation: str = "none"

    def __post_init__(self) -> None:
        for name, low in (("mean", -math.inf), ("std", 0.0)):
            values = getattr(self, name)
            if (not isinstance(values, Sequence) or len(values) != 3
                    or not all(isinstance(v, int | float) and not isinstance(v, bool)
                               and math.isfinite(v) and v > low for v in values)):
                bound = " positive" if low == 0.0 else ""
                raise ValueError(f"input normalisation field {name!r}: expected 3 finite"
                                 f"{bound} numbers, got {values!r}")
        if self.stain_normalisation not in STAIN_NORMALISATIONS:
            raise ValueError(f"input normalisation field 'stain_normalisation': expected one "
                             f"of {STAIN_NORMALISATIONS}, got {self.stain_normalisation!r}")

    @classmethod
    def for_backbone(cls, backbone: str, stain_normalisation: str = "none") -> ModelInput:
        """The input of ``backbone`` (its own mean/std) after ``stain_normalisation``."""
        mean, std = backbone_mean_std(backbone)
        return cls(mean, std, stain_normalisation)

    def place(self, images: np.ndarray, device: torch.device) -> torch.Tensor:
        """Decoded uint8 host images (N, S, S, 3), stain-normalised, on ``device`` (or in
        pinned host memory, see ``common.train.images_on_device``); ``images`` is not changed.

        The one function that stain-normalises: it refuses a tensor, which was placed already.
        """
        if isinstance(images, torch.Tensor):
            raise TypeError("ModelInput.place takes decoded host images (a numpy array); a "
                            "tensor was placed, and stain-normalised, already")
        placed = images_on_device(images, device)
        normaliser = build_stain_normaliser(self.stain_normalisation)
        if normaliser is None or not len(placed):
            return placed
        if placed.device.type == "cpu" and not placed.is_pinned():
            placed = placed.clone()  # images_on_device shares the caller's array on the CPU
        normaliser = normaliser.to(device)
        for start in range(0, len(placed), NORMALISE_CHUNK):
            chunk = placed[start:start + NORMALISE_CHUNK]
            chunk.copy_(normaliser(chunk.to(device, non_blocking=True)))
        return placed

    def normalise(self, batch_u8: torch.Tensor) -> torch.Tensor:
        """A placed uint8 batch (B, H, W, 3) as the model's float input (B, 3, H, W)."""
        return to_model_input(batch_u8, self.mean, self.std)
