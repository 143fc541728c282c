"""Batch indices for a fixed number of local steps, instance- or class-balanced.

Instance-balanced sampling draws every image with the same probability, class-balanced sampling
every class present with the same probability (then an image of it uniformly); ``balance`` in
[0, 1] mixes the two, ``p = (1 - balance) p_instance + balance p_class``, as in the
progressively-balanced sampling of Kang et al. 2020 ("Decoupling representation and classifier
for long-tailed recognition"). Draws are with replacement, so a rare class is revisited within
a round and a site's round costs ``steps`` batches whatever its size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sampling_weights(labels: Tensor, balance: float = 1.0) -> Tensor:
    """Probability (N,) of drawing each image: ``balance`` mixes instance- (0) and
    class-balanced (1) sampling over the classes present in ``labels``."""
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    if labels.ndim != 1 or not len(labels):
        raise ValueError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    labels = labels.long()
    counts = torch.bincount(labels).double()
    present = int((counts > 0).sum())
    class_balanced = 1.0 / (present * counts[labels])
    instance = torch.full_like(class_balanced, 1.0 / len(labels))
    return (1 - balance) * instance + balance * class_balanced


def balanced_batches(labels: Tensor, steps: int, batch_size: int,
                     generator: torch.Generator | None = None, balance: float = 1.0) -> Tensor:
    """Image indices (steps, batch_size) drawn with replacement from :func:`sampling_weights`.

    ``labels`` and ``generator`` must be on the same device; the indices come back on it.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    weights = sampling_weights(labels, balance)
    flat = torch.multinomial(weights, steps * batch_size, replacement=True, generator=generator)
    return flat.view(steps, batch_size)
