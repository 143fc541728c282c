"""Metrics against values computed by hand."""

import numpy as np
import pytest

from common.metrics import classification_metrics, expected_calibration_error, reliability_bins

CLASSES = ("a", "b", "c")


def one_hot(predictions, n=3, confidence=0.8):
    probabilities = np.full((len(predictions), n), (1 - confidence) / (n - 1))
    probabilities[np.arange(len(predictions)), predictions] = confidence
    return probabilities


def test_macro_f1_and_balanced_accuracy_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    metrics = classification_metrics(labels, one_hot(predictions), CLASSES)
    # class a: tp 3, fp 1, fn 1 -> F1 0.75; b: tp 1, fp 1, fn 1 -> 0.5; c: 1.0
    assert metrics["per_class_f1"] == pytest.approx({"a": 0.75, "b": 0.5, "c": 1.0})
    assert metrics["macro_f1"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]


def test_absent_class_is_not_scored():
    labels = np.array([0, 0, 1, 1])
    metrics = classification_metrics(labels, one_hot(np.array([0, 0, 1, 1])), CLASSES)
    assert metrics["per_class_f1"]["c"] is None
    assert metrics["macro_f1"] == pytest.approx(1.0)


def test_calibration_error_by_hand():
    labels = np.array([0, 1, 0, 0])
    probabilities = one_hot(np.array([0, 0, 0, 0]), confidence=0.8)
    # all in one bin: confidence 0.8, accuracy 0.75
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.05)
    bins = reliability_bins(labels, probabilities)
    assert len(bins) == 1 and bins[0]["count"] == 4


@pytest.mark.parametrize("seed", range(20))
def test_scores_equal_scikit_learns_on_random_imbalanced_predictions(seed):
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

    rng = np.random.default_rng(seed)
    classes = tuple("abcdef")
    # Skewed labels, some classes absent; predictions may name absent classes.
    labels = rng.choice(6, size=int(rng.integers(5, 80)), p=[0.5, 0.3, 0.1, 0.1, 0.0, 0.0])
    probabilities = rng.dirichlet(np.ones(6) * 0.3, size=len(labels))
    predictions = probabilities.argmax(axis=1)
    present = np.unique(labels)
    metrics = classification_metrics(labels, probabilities, classes)
    assert metrics["macro_f1"] == pytest.approx(
        f1_score(labels, predictions, labels=present, average="macro", zero_division=0))
    assert metrics["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, predictions))
    expected = f1_score(labels, predictions, labels=np.arange(6), average=None, zero_division=0)
    for i, name in enumerate(classes):
        assert metrics["per_class_f1"][name] == (
            pytest.approx(expected[i]) if i in present else None)
    assert metrics["confusion_matrix"] == sklearn_confusion_matrix(
        labels, predictions, labels=np.arange(6)).tolist()
