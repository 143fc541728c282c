"""One run config -> data, model, local fit and scoring: what client, server and baselines share."""

from __future__ import annotations

import copy
import functools
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.augment import build_augmenter
from common.calibration import NllCurve, nll_curve
from common.config import RunConfig
from common.data import CentreData, CentreSpec, split_indices
from common.losses import create_loss, logit_scale
from common.methods import create_method
from common.model_input import ModelInput
from common.models import batchnorm_keys, create_model
from common.train import (
    TrainSettings,
    adapt_batchnorm,
    evaluate_model,
    predict_logits,
    prepare_model,
    resolve_device,
    train_local,
)


def cache_dir(config: RunConfig) -> Path:
    """The decoded-image cache: ``CYTOFED_CACHE_DIR`` if set, else the run config's."""
    return Path(os.environ.get("CYTOFED_CACHE_DIR", config.cache_dir)).expanduser()


@functools.lru_cache(maxsize=8)
def _load_centre_cached(spec: CentreSpec, image_size: int, cache: Path, mode: str,
                        synthetic_images: int) -> CentreData:
    from common.centres import load_centre

    return load_centre(spec, image_size, cache, mode=mode, synthetic_images=synthetic_images)


def load_centre_data(spec: CentreSpec, config: RunConfig) -> CentreData:
    """A centre's images at the configured size and field of view (memoised per process)."""
    return _load_centre_cached(spec, config.image_size, cache_dir(config).resolve(),
                               config.field_of_view, config.synthetic_images)


def centre_splits(data: CentreData, seed: int) -> dict[str, CentreData]:
    """The centre's stratified, grouped train/val/test splits."""
    return {name: data.subset(index)
            for name, index in split_indices(data.labels, data.groups, seed).items()}


def new_model(config: RunConfig, num_classes: int) -> nn.Module:
    """The configured backbone, seeded so every site and the server start identical; its
    logits carry the loss's scale (see ``common.losses.logit_scale``)."""
    torch.manual_seed(config.seed)
    return create_model(config.model, num_classes, config.pretrained, config.norm,
                        logit_scale=logit_scale(config.loss))


def model_input(config: RunConfig) -> ModelInput:
    """How the run's images become its model's input: the configured stain normalisation,
    then the backbone's own mean/std (see ``common.model_input``)."""
    return ModelInput.for_backbone(config.model, config.stain_normalise)


def place(data: CentreData, config: RunConfig) -> torch.Tensor:
    """``data``'s images placed for the run's model (``ModelInput.place``): what every
    ``images`` argument below holds."""
    return model_input(config).place(data.images, resolve_device(config.device))


def round_seed(run_seed: int, server_round: int, site: str) -> int:
    """The seed of ``site``'s local training in ``server_round``: every site and round draws
    its own batches and augmentations, the same ones when the run is repeated."""
    sequence = np.random.SeedSequence([run_seed, server_round, zlib.crc32(site.encode())])
    return int(sequence.generate_state(1)[0])


def fit(model: nn.Module, data: CentreData, config: RunConfig, class_counts: np.ndarray,
        progress: float, seed: int, images: torch.Tensor | None = None,
        restainer: nn.Module | None = None, centres: int = 1) -> dict[str, float]:
    """Train ``model`` in place on ``data`` for ``config.local_epochs`` epochs, or
    ``config.local_steps`` steps per centre when set, with the settings the run's method gives
    a local fit (see ``common.methods``).

    ``images``: ``data`` already placed by :func:`place` (once, by a caller that trains on
    the same data again); placed here when None. ``restainer`` (``common.stain.Restainer``)
    re-stains training batches before the augmentation. ``centres``: how many training
    centres ``data`` pools (a pooled reference takes the steps of all of them).
    """
    device = resolve_device(config.device)
    settings = create_method(config).local_settings(TrainSettings(
        epochs=config.local_epochs, steps=config.local_steps * centres,
        sampling_balance=config.sampling_balance, batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, seed=seed,
        compile=config.compile))
    loss_fn = create_loss(config.loss, class_counts, progress=min(max(progress, 0.0), 1.0))
    model = prepare_model(model, device)
    inputs = model_input(config)
    augmenter = build_augmenter(config.augment, mean=inputs.mean, std=inputs.std,
                                restainer=restainer)
    return train_local(model, _placed(data, images, config), data.labels, loss_fn,
                       settings, augmenter, device)


def score(model: nn.Module, data: CentreData, config: RunConfig,
          images: torch.Tensor | None = None, temperature: float = 1.0) -> dict:
    """Held-out style metrics of ``model`` on a labelled centre at ``temperature`` (see
    ``common.train.logit_metrics``); ``images`` as in :func:`fit`."""
    device = resolve_device(config.device)
    model = prepare_model(model, device)
    return evaluate_model(model, _placed(data, images, config), data.labels, data.classes,
                          device, model_input(config), temperature)


def _placed(data: CentreData, images: torch.Tensor | None, config: RunConfig) -> torch.Tensor:
    """``images`` if given (checked against ``data``), else ``data`` placed now."""
    if images is None:
        return place(data, config)
    if tuple(images.shape) != data.images.shape:
        raise ValueError(f"centre {data.name!r}: placed images have shape "
                         f"{tuple(images.shape)}, the data {data.images.shape}")
    return images


def uses_test_time_bn(config: RunConfig) -> bool:
    """Whether the run's model is applied after test-time BatchNorm adaptation: asked for, or
    always under a method that adapts (FedBN)."""
    return config.test_time_bn or create_method(config).adapts_batchnorm_at_test


def adapted_copy(model: nn.Module, images: torch.Tensor, config: RunConfig) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics re-estimated on placed ``images``
    (unlabelled)."""
    device = resolve_device(config.device)
    return adapt_batchnorm(prepare_model(copy.deepcopy(model), device), images, device,
                           model_input(config))


def as_applied(model: nn.Module, images: torch.Tensor, config: RunConfig) -> nn.Module:
    """``model`` as the run applies it to ``images``: an adapted copy when the run adapts
    BatchNorm at test time (see :func:`uses_test_time_bn`), else ``model`` itself."""
    if uses_test_time_bn(config) and batchnorm_keys(model):
        return adapted_copy(model, images, config)
    return model


def score_held_out(model: nn.Module, data: CentreData, config: RunConfig,
                   images: torch.Tensor | None = None,
                   temperature: float = 1.0) -> dict[str, dict | None]:
    """Plain metrics of ``model`` on the held-out centre and, reported separately, those after
    test-time BatchNorm adaptation on the centre's unlabelled images (None when not configured
    or the model has no BatchNorm), both at ``temperature``.

    Returns ``{"held_out": ..., "held_out_bn_adapted": ...}``; ``model`` is left unchanged;
    ``images`` as in :func:`fit`.
    """
    images = _placed(data, images, config)
    adapted = None
    if uses_test_time_bn(config) and batchnorm_keys(model):
        adapted = score(adapted_copy(model, images, config), data, config, images, temperature)
    return {"held_out": score(model, data, config, images, temperature),
            "held_out_bn_adapted": adapted}


def score_as_applied(model: nn.Module, data: CentreData, config: RunConfig,
                     images: torch.Tensor | None = None,
                     temperature: float = 1.0) -> dict | None:
    """Metrics of ``model`` on a site's split at ``temperature`` as the exported model is
    applied (:func:`as_applied`); None for an empty split. ``model`` is left unchanged;
    ``images`` as in :func:`fit`."""
    if len(data) == 0:
        return None
    images = _placed(data, images, config)
    return score(as_applied(model, images, config), data, config, images, temperature)


def temperature_curve(model: nn.Module, data: CentreData, config: RunConfig,
                      images: torch.Tensor | None = None) -> NllCurve | None:
    """The summed NLL of ``model``'s logits on a site's split (as applied) at every grid
    temperature (``common.calibration.nll_curve``); None for an empty split."""
    if len(data) == 0:
        return None
    images = _placed(data, images, config)
    device = resolve_device(config.device)
    model = prepare_model(as_applied(model, images, config), device)
    return nll_curve(predict_logits(model, images, device, model_input(config)), data.labels)
