"""Held-out-centre evaluation of the global model (the centre never trains)."""

from __future__ import annotations

import torch
from torch import nn

from common.config import RunConfig
from common.data import CentreData
from common.pipeline import score_held_out
from common.weights import load_state


def evaluate_held_out(model: nn.Module, state: dict, held_out: CentreData, config: RunConfig,
                      images: torch.Tensor | None = None,
                      temperature: float = 1.0) -> dict[str, dict | None]:
    """Metrics of the global weights ``state`` at ``temperature`` on every image of the
    held-out centre.

    ``state`` is loaded into ``model``, the server's evaluation model (every tensor replaced);
    ``images`` are the centre's images placed once for the run (placed per call when None).
    Returns ``{"held_out": plain, "held_out_bn_adapted": after test-time BatchNorm adaptation
    or None}`` (see :func:`common.pipeline.score_held_out`).
    """
    load_state(model, state)
    return score_held_out(model, held_out, config, images, temperature)
