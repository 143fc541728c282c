"""Bootstrap interval of macro-F1 from a confusion matrix, against resampling the images."""

from __future__ import annotations

import numpy as np
import pytest

from common.bootstrap import macro_f1_interval, macro_f1_of_matrices
from common.metrics import classification_metrics, confusion_matrix

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
RESAMPLES = 4000


def centre(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions of a small held-out centre with one basophil."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(5), [40, 15, 10, 8, 1])
    predictions = np.where(rng.random(len(labels)) < 0.75, labels,
                           rng.integers(0, 5, len(labels)))
    return labels, predictions


def direct_bootstrap(labels: np.ndarray, predictions: np.ndarray, stratified: bool,
                     seed: int) -> np.ndarray:
    """Macro-F1 of ``RESAMPLES`` resamples of the (label, prediction) pairs themselves."""
    rng = np.random.default_rng(seed)
    if stratified:
        index = np.concatenate([rng.choice(np.flatnonzero(labels == c), (RESAMPLES, n))
                                for c, n in zip(*np.unique(labels, return_counts=True),
                                                strict=True)], axis=1)
    else:
        index = rng.integers(0, len(labels), (RESAMPLES, len(labels)))
    matrices = [confusion_matrix(labels[row], predictions[row], 5) for row in index]
    return macro_f1_of_matrices(np.stack(matrices))


def test_point_estimate_is_the_reported_macro_f1() -> None:
    labels, predictions = centre(1)
    matrix = confusion_matrix(labels, predictions, 5)
    reported = classification_metrics(labels, np.eye(5)[predictions], CLASSES)["macro_f1"]
    assert macro_f1_interval(matrix, resamples=10)["macro_f1"] == pytest.approx(reported)
    assert macro_f1_of_matrices(matrix) == pytest.approx(reported)


@pytest.mark.parametrize("stratified", [False, True])
def test_interval_matches_resampling_labels_and_predictions(stratified: bool) -> None:
    labels, predictions = centre()
    interval = macro_f1_interval(confusion_matrix(labels, predictions, 5), RESAMPLES,
                                 stratified=stratified, seed=0)
    direct = direct_bootstrap(labels, predictions, stratified, seed=1)
    low, high = np.quantile(direct, [0.025, 0.975])
    assert interval["low"] == pytest.approx(low, abs=0.03)
    assert interval["high"] == pytest.approx(high, abs=0.03)
    assert interval["low"] < interval["macro_f1"] < interval["high"]
    assert interval["stratified"] is stratified


def test_perfect_predictions_have_no_spread_and_bad_input_is_refused() -> None:
    matrix = np.diag([5, 4, 3, 2, 1])
    interval = macro_f1_interval(matrix, resamples=200, stratified=True)
    assert interval["low"] == interval["high"] == interval["macro_f1"] == 1.0
    with pytest.raises(ValueError, match="square confusion matrix"):
        macro_f1_interval(np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match="square confusion matrix"):
        macro_f1_interval(np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="level"):
        macro_f1_interval(matrix, level=95)
