"""Classification metrics for imbalanced classes (scikit-learn underneath)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           classes: Sequence[str]) -> dict:
    """Macro-F1, balanced accuracy, accuracy, per-class F1, confusion matrix and ECE.

    Macro-F1 and balanced accuracy average over the classes present in ``labels`` (a class a
    centre never sees cannot be scored); per-class F1 is ``None`` for absent classes. The
    confusion matrix has rows = true class and columns = predicted class, in ``classes`` order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(probabilities).argmax(axis=1)
    all_classes = np.arange(len(classes))
    present = np.unique(labels)
    per_class = f1_score(labels, predictions, labels=all_classes, average=None, zero_division=0)
    return {
        "macro_f1": float(f1_score(labels, predictions, labels=present, average="macro",
                                   zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "accuracy": float(np.mean(predictions == labels)),
        "ece": expected_calibration_error(labels, probabilities),
        "num_examples": len(labels),
        "per_class_f1": {name: (float(per_class[i]) if i in present else None)
                         for i, name in enumerate(classes)},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=all_classes).tolist(),
    }


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray,
                               n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence over ``n_bins`` equal-width bins."""
    bins = reliability_bins(labels, probabilities, n_bins)
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total)


def reliability_bins(labels: np.ndarray, probabilities: np.ndarray,
                     n_bins: int = 15) -> list[dict[str, float]]:
    """Per confidence bin: count, mean confidence and accuracy (non-empty bins only)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    bin_of = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    return [{"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": int(np.sum(in_bin)),
             "confidence": float(confidence[in_bin].mean()),
             "accuracy": float(correct[in_bin].mean())}
            for b in range(n_bins) if np.any(in_bin := bin_of == b)]
