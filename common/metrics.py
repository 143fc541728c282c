"""Classification metrics for imbalanced classes and calibration, from the confusion matrix.

(Plain numpy, equal to scikit-learn's ``f1_score``/``balanced_accuracy_score`` as the tests
check: a deployed site starts a fresh process per message, and importing ``sklearn.metrics``
cost it about a second each time.)

The ``uncertain`` flag of an exported model comes from :func:`uncertainty_threshold`: among
the equal-width bin edges of the top-class probability, the smallest threshold ``t`` such that
predictions with confidence >= ``t`` are wrong at most ``target_error`` of the time (default 5%)
on the training sites' pooled validation histograms (aggregate counts, never per-image data).
If no edge qualifies the threshold is 1.0 and every prediction is flagged uncertain.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE_BINS = 20  # equal-width bins of the top-class probability, for the threshold
TARGET_ERROR = 0.05  # error rate allowed among predictions not flagged uncertain


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           classes: Sequence[str]) -> dict:
    """:func:`confusion_metrics` plus ECE, reliability bins and the confidence histogram."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(probabilities).argmax(axis=1)
    return {
        **confusion_metrics(confusion_matrix(labels, predictions, len(classes)), classes),
        "ece": expected_calibration_error(labels, probabilities),
        "reliability": reliability_bins(labels, probabilities),
        "confidence_histogram": confidence_histogram(labels, probabilities),
    }


def confusion_metrics(matrix: np.ndarray | Sequence[Sequence[int]],
                      classes: Sequence[str]) -> dict:
    """Macro-F1, balanced accuracy, accuracy, per-class F1 and the matrix, from confusion counts.

    Macro-F1 and balanced accuracy average over the classes present (non-empty rows: a class a
    centre never sees cannot be scored); per-class F1 is ``None`` for absent classes. The
    confusion matrix has rows = true class and columns = predicted class, in ``classes`` order.
    Counts may be scaled (floats), as when sites are weighted (``common.selection``).
    Raises ValueError for a matrix without any example.
    """
    matrix = np.asarray(matrix)
    matrix = matrix if np.issubdtype(matrix.dtype, np.floating) else matrix.astype(np.int64)
    if matrix.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix of shape {matrix.shape} for {len(classes)} classes")
    if matrix.sum() == 0:
        raise ValueError("the confusion matrix holds no example")
    present = np.flatnonzero(matrix.sum(axis=1))
    true_positives = np.diag(matrix)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    per_class = _safe_divide(2 * true_positives, predicted + actual)
    return {
        "macro_f1": float(per_class[present].mean()),
        "balanced_accuracy": float(_safe_divide(true_positives, actual)[present].mean()),
        "accuracy": float(true_positives.sum() / matrix.sum()),
        "num_examples": round(float(matrix.sum())),
        "per_class_f1": {name: (float(per_class[i]) if i in present else None)
                         for i, name in enumerate(classes)},
        "confusion_matrix": matrix.tolist(),
    }


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): rows = true class, columns = predicted class."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)),
                     where=denominator > 0)


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


def confidence_histogram(labels: np.ndarray, probabilities: np.ndarray,
                         n_bins: int = CONFIDENCE_BINS) -> dict[str, list[int]]:
    """Counts of correct and of wrong top-class predictions per equal-width confidence bin."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    bin_of = np.minimum((probabilities.max(axis=1) * n_bins).astype(int), n_bins - 1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    return {"correct": np.bincount(bin_of[correct], minlength=n_bins).tolist(),
            "wrong": np.bincount(bin_of[~correct], minlength=n_bins).tolist()}


def confident_share(correct: Sequence[float], wrong: Sequence[float],
                    threshold: float) -> dict[str, float | None]:
    """Coverage (share of predictions with confidence >= ``threshold``) and their error rate.

    ``correct``/``wrong`` is a :func:`confidence_histogram` (counts or fractions); the threshold
    is rounded up to a bin edge. The error rate is None when nothing is confident.
    """
    first = int(np.ceil(threshold * len(correct) - 1e-9))
    confident_wrong = float(np.sum(wrong[first:]))
    confident = float(np.sum(correct[first:])) + confident_wrong
    total = float(np.sum(correct) + np.sum(wrong))
    if total <= 0:
        raise ValueError("the confidence histogram is empty")
    return {"coverage": confident / total,
            "error_rate": confident_wrong / confident if confident > 0 else None}


def uncertainty_threshold(correct: Sequence[float], wrong: Sequence[float],
                          target_error: float = TARGET_ERROR) -> dict[str, float | None]:
    """The smallest bin edge whose confident predictions err at most ``target_error`` of the
    time (see the module docstring), with the coverage and error rate it gives."""
    def meets_target(threshold: float) -> bool:
        error_rate = confident_share(correct, wrong, threshold)["error_rate"]
        return error_rate is not None and error_rate <= target_error

    edges = (edge / len(correct) for edge in range(len(correct)))
    threshold = next((edge for edge in edges if meets_target(edge)), 1.0)
    return {"threshold": threshold, "target_error": target_error,
            **confident_share(correct, wrong, threshold)}
