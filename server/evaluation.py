"""Held-out-centre evaluation of the global model (the centre never trains)."""

from __future__ import annotations

import copy

from torch import nn

from common.config import RunConfig
from common.data import CentreData
from common.pipeline import score
from common.train import adapt_batchnorm, images_on_device, resolve_device
from common.weights import load_state


def evaluate_held_out(model: nn.Module, state: dict, held_out: CentreData, config: RunConfig,
                      adapt_bn: bool) -> dict:
    """Metrics of the global weights ``state`` on every image of the held-out centre.

    With ``adapt_bn`` BatchNorm statistics are first re-estimated on the held-out images
    without their labels (test-time adaptation); the caller reports that separately.
    """
    model = copy.deepcopy(model)
    load_state(model, state)
    if adapt_bn:
        device = resolve_device(config.device)
        adapt_batchnorm(model.to(device), images_on_device(held_out.images, device), device)
    return score(model, held_out, config)
