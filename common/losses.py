"""Classification losses for heavily imbalanced white-blood-cell classes, DomainBed-style.

Every loss is one small ``nn.Module`` registered by name in ``LOSSES``; all hyper-parameters
and their defaults live in ``LossHParams``. Each loss class is constructed as
``cls(class_counts, progress, hparams)`` with ``class_counts`` a float tensor of per-class
training-image counts (local or federated-summed, the caller decides) and ``progress`` the
fraction of training done in [0, 1]. Adding a loss is one class plus one registry line.

Zero counts: wherever counts become weights, priors or margins they are clamped to at least 1,
so classes absent from the training data give finite values (they are treated like a class
seen once: the largest weight / margin, the smallest prior).

Weighted losses return the plain batch mean of ``weight[target] * loss``; weights are
normalised (mean 1 or sum C) so the loss scale stays comparable to unweighted cross-entropy.
Weights are buffers: move the loss with ``.to(device)`` alongside the model. Losses are
computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LossHParams:
    """Hyper-parameters of all registered losses, with their defaults."""

    focal_gamma: float = 2.0
    cb_beta: float = 0.999
    cb_focal: bool = False  # class_balanced: weight focal loss instead of cross-entropy
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    drw_start: float = 0.5  # fraction of training after which ldam_drw re-weights
    drw_beta: float = 0.9999
    logit_adjust_tau: float = 1.0
    label_smoothing: float = 0.1
    weight_power: float = 1.0  # weighted_ce: weights proportional to count ** -weight_power


# ---------------------------------------------------------------------------------------------
# Shared pure helpers
# ---------------------------------------------------------------------------------------------


def counts_to_tensor(class_counts: Sequence[int] | np.ndarray | Tensor) -> Tensor:
    """Validate per-class counts (1-D, non-empty, finite, non-negative); return float64."""
    counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape "
                         f"{tuple(counts.shape)}")
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"class_counts must be finite and non-negative, got {counts.tolist()}")
    return counts


def log_prior(counts: Tensor) -> Tensor:
    """Log class prior log(n_c / sum n), counts clamped to at least 1."""
    clamped = counts.clamp_min(1.0)
    return (clamped / clamped.sum()).log()


def inverse_frequency_weights(counts: Tensor, power: float = 1.0) -> Tensor:
    """Weights proportional to n_c ** -power, averaging 1 over present classes (n_c > 0)."""
    weights = counts.clamp_min(1.0).pow(-power)
    present = counts > 0
    reference = weights[present] if present.any() else weights
    return weights / reference.mean()


def class_balanced_weights(counts: Tensor, beta: float) -> Tensor:
    """Cui et al. 2019 weights (1 - beta) / (1 - beta ** n_c), normalised to sum to C."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"class-balanced beta must be in [0, 1), got {beta}")
    weights = (1.0 - beta) / (1.0 - beta ** counts.clamp_min(1.0))
    return weights * len(counts) / weights.sum()


def ldam_margins(counts: Tensor, max_margin: float) -> Tensor:
    """Cao et al. 2019 margins proportional to n_c ** -1/4, the largest equal to max_margin."""
    margins = counts.clamp_min(1.0).pow(-0.25)
    return margins * max_margin / margins.max()


def batch_mean(per_example: Tensor, targets: Tensor, class_weights: Tensor | None) -> Tensor:
    """Mean over the batch of per-example losses, each scaled by its target's class weight."""
    if class_weights is None:
        return per_example.mean()
    return (class_weights[targets] * per_example).mean()


def focal_per_example(logits: Tensor, targets: Tensor, gamma: float) -> Tensor:
    """Per-example focal loss -(1 - p_t) ** gamma * log p_t (Lin et al. 2017)."""
    log_pt = logits.log_softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
    # Clamped away from 0 so the gradient of (1 - p_t) ** gamma stays finite for gamma < 1.
    one_minus_pt = (-torch.expm1(log_pt)).clamp_min(torch.finfo(log_pt.dtype).tiny)
    return -one_minus_pt.pow(gamma) * log_pt


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


class CrossEntropyLoss(nn.Module):
    """Plain cross-entropy; class counts are ignored."""

    def __init__(self, class_counts: Tensor, progress: float, hparams: LossHParams) -> None:
        super().__init__()

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets)


class WeightedCrossEntropyLoss(nn.Module):
    """Cross-entropy with inverse-frequency class weights (n_c ** -weight_power, mean 1)."""

    def __init__(self, class_counts: Tensor, progress: float, hparams: LossHParams) -> None:
        super().__init__()
        weights = inverse_frequency_weights(class_counts, hparams.weight_power)
        self.register_buffer("class_weights", weights.float())

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        per_example = F.cross_entropy(logits.float(), targets, reduction="none")
        return batch_mean(per_example, targets, self.class_weights)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection"); gamma=0 is CE."""

    def __init__(self, class_counts: Tensor, progress: float, hparams: LossHParams) -> None:
        super().__init__()
        self.gamma = hparams.focal_gamma

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return focal_per_example(logits.float(), targets, self.gamma).mean()


class ClassBalancedLoss(nn.Module):
    """Class-balanced CE or focal loss (Cui et al. 2019, "Class-Balanced Loss Based on
    Effective Number of Samples"); beta=0 gives uniform weights."""

    def __init__(self, class_counts: Tensor, progress: float, hparams: LossHParams) -> None:
        super().__init__()
        self.gamma = hparams.focal_gamma if hparams.cb_focal else 0.0
        weights = class_balanced_weights(class_counts, hparams.cb_beta)
        self.register_buffer("class_weights", weights.float())

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        per_example = focal_per_example(logits.float(), targets, self.gamma)
        return batch_mean(per_example, targets, self.class_weights)


class LDAMDRWLoss(nn.Module):
    """LDAM with deferred re-weighting (Cao et al. 2019, "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss"): class-balanced weights once progress >= drw_start.

    LDAM's cross-entropy is on s * (z - margin). The scale s belongs to the model, not the loss
    (:meth:`logit_scale`: the model's logits are s * z, in training and at inference, so its
    probabilities are calibrated like cross-entropy's); the loss subtracts s * margin.
    """

    class_weights: Tensor | None

    def __init__(self, class_counts: Tensor, progress: float, hparams: LossHParams) -> None:
        super().__init__()
        margins = hparams.ldam_scale * ldam_margins(class_counts, hparams.ldam_max_margin)
        self.register_buffer("scaled_margins", margins.float())
        weights = None
        if progress >= hparams.drw_start:
            weights = class_balanced_weights(class_counts, hparams.drw_beta).float()
        self.register_buffer("class_weights", weights)

    @staticmethod
    def logit_scale(hparams: LossHParams) -> float:
        """The factor s the model multiplies its logits by."""
        return hparams.ldam_scale

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        true_class = F.one_hot(targets, logits.shape[1]).bool()
        margined = logits.float() - true_class * self.scaled_margins[targets, None]
        per_example = F.cross_entropy(margined, targets, reduction="none")
        return batch_mean(per_example, targets, self.class_weights)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted CE on logits + tau * log prior (Menon et al. 2021, "Long-Tail Learning
    via Logit Adjustment"); tau defaults to hparams.logit_adjust_tau."""

    def __init__(self, class_counts: Tensor, progress: float, hparams: LossHParams,
                 tau: float | None = None) -> None:
        super().__init__()
        tau = hparams.logit_adjust_tau if tau is None else tau
        self.register_buffer("logit_offsets", (tau * log_prior(class_counts)).float())

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float() + self.logit_offsets, targets)


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax, CE on logits + log prior (Ren et al. 2020, "Balanced Meta-Softmax for
    Long-Tailed Visual Recognition"): logit adjustment with tau = 1."""

    def __init__(self, class_counts: Tensor, progress: float, hparams: LossHParams) -> None:
        super().__init__(class_counts, progress, hparams, tau=1.0)


class LabelSmoothingLoss(nn.Module):
    """Cross-entropy with label smoothing (Szegedy et al. 2016, "Rethinking the Inception
    Architecture"); class counts are ignored."""

    def __init__(self, class_counts: Tensor, progress: float, hparams: LossHParams) -> None:
        super().__init__()
        self.smoothing = hparams.label_smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.smoothing)


LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropyLoss,
    "weighted_ce": WeightedCrossEntropyLoss,
    "focal": FocalLoss,
    "class_balanced": ClassBalancedLoss,
    "ldam_drw": LDAMDRWLoss,
    "balanced_softmax": BalancedSoftmaxLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "label_smoothing": LabelSmoothingLoss,
}


def available_losses() -> list[str]:
    """Registered loss names, in registry order."""
    return list(LOSSES)


def logit_scale(name: str, hparams: LossHParams | None = None) -> float:
    """The factor by which a model trained with loss ``name`` multiplies its logits, in
    training and at inference (a loss class's ``logit_scale``; 1 for most losses)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(available_losses())}")
    scale = getattr(LOSSES[name], "logit_scale", None)
    return scale(hparams or LossHParams()) if scale else 1.0


def create_loss(name: str, class_counts: Sequence[int] | np.ndarray, progress: float = 0.0,
                hparams: LossHParams | None = None) -> nn.Module:
    """Build the registered loss ``name`` from per-class training counts and training progress.

    Raises ValueError for an unknown name, empty / non-1-D / negative counts, or progress
    outside [0, 1].
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(available_losses())}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    counts = counts_to_tensor(class_counts)
    return LOSSES[name](counts, progress, hparams or LossHParams())
