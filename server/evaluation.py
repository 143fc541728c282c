"""Held-out-centre evaluation of the global model (the centre never trains)."""

from __future__ import annotations

import copy

from torch import nn

from common.config import RunConfig
from common.data import CentreData
from common.pipeline import score_held_out
from common.weights import load_state


def evaluate_held_out(model: nn.Module, state: dict, held_out: CentreData,
                      config: RunConfig) -> dict[str, dict | None]:
    """Metrics of the global weights ``state`` on every image of the held-out centre.

    ``{"held_out": plain, "held_out_bn_adapted": after test-time BatchNorm adaptation or None}``
    (see :func:`common.pipeline.score_held_out`).
    """
    model = copy.deepcopy(model)
    load_state(model, state)
    return score_held_out(model, held_out, config)
