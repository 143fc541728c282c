"""Central differential privacy without Flower: which tensors are trained, and clipping.

Only trained tensors (the optimiser's parameters) are clipped at the site and noised at the
server. Buffers such as BatchNorm's running means and variances are estimated, not trained:
they are sent as they are, averaged in clear and not covered by epsilon (noise on a variance
makes it negative, and the model's predictions NaN).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
from torch import nn

# Training-config key: the state-dict keys a site sends without clipping (the model's buffers).
BUFFERS_KEY = "dp-buffers"


def untrained_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model`` that no optimiser step changes (its buffers)."""
    trained = {name for name, _ in model.named_parameters()}
    return {key for key in model.state_dict() if key not in trained}


def clip_factor(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                clipping_norm: float, keys: Collection[str]) -> float:
    """What scales ``state - reference`` over ``keys`` (all together, as one vector) down to
    L2 norm ``clipping_norm`` when it is longer (1 otherwise); reads one tensor at a time."""
    squared = 0.0
    for key in keys:
        difference = np.subtract(state[key], reference[key], dtype=np.float64)
        squared += float(np.vdot(difference, difference))
    norm = float(np.sqrt(squared))
    return clipping_norm / norm if norm > clipping_norm else 1.0


def clipped_update(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                   clipping_norm: float, keys: Collection[str]) -> dict[str, np.ndarray]:
    """``state - reference`` over ``keys`` in float64, scaled by :func:`clip_factor`."""
    scale = clip_factor(state, reference, clipping_norm, keys)
    return {key: np.subtract(state[key], reference[key], dtype=np.float64) * scale
            for key in keys}


def clip_state(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
               clipping_norm: float, keys: Collection[str]) -> dict[str, np.ndarray]:
    """``state`` whose update from ``reference`` over ``keys`` is clipped to ``clipping_norm``;
    the other tensors are returned unchanged."""
    update = clipped_update(state, reference, clipping_norm, keys)
    return {key: (reference[key] + update[key]).astype(value.dtype) if key in update else value
            for key, value in state.items()}
