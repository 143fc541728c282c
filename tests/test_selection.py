"""The one selection rule and the site reports it reads (counts only)."""

import numpy as np
import pytest

from common.metrics import classification_metrics
from common.selection import (
    best_round,
    combine_site_reports,
    macro_f1,
    selection_score,
    site_report,
    usable_reports,
)

CLASSES = ("a", "b")


def report(labels: list[int], predictions: list[int]) -> dict:
    """A site's validation report for these predictions."""
    probabilities = np.eye(2)[predictions] * 0.8 + 0.1
    metrics = {**classification_metrics(np.array(labels), probabilities, CLASSES), "loss": 0.5}
    return site_report("val", metrics, len(CLASSES))


def test_a_site_report_holds_counts_and_shares_only():
    sent = report([0, 0, 1], [0, 1, 1])
    assert sent["val_confusion_matrix"] == [1, 1, 0, 1]
    assert sent["num-examples"] == 3
    assert sum(sent["val_correct_by_confidence"]) + sum(sent["val_wrong_by_confidence"]) == 1
    assert site_report("test", None, 2) == {"test_confusion_matrix": [0] * 4, "num-examples": 0}
    with pytest.raises(ValueError, match="unknown split 'train'"):
        site_report("train", None, 2)


def test_sites_are_pooled_by_summing_their_confusion_counts():
    # Site 1: 90 images, every one right but the only b is missed. Site 2: 10 images, all b,
    # all right. Pooled (rows: true class), b is found 10 times of 11.
    big = report([0] * 89 + [1], [0] * 90)
    small = report([1] * 10, [1] * 10)
    pooled = combine_site_reports([big, small, site_report("val", None, 2)])
    assert pooled["val_confusion_matrix"] == [89, 0, 1, 10]
    assert pooled["num-examples"] == 100
    assert pooled["val_macro_f1"] == pytest.approx(macro_f1([[89, 0], [1, 10]]))
    assert pooled["val_loss"] == pytest.approx(0.5)
    weighted_mean_of_site_f1 = 0.9 * big["val_macro_f1"] + 0.1 * small["val_macro_f1"]
    assert pooled["val_macro_f1"] > weighted_mean_of_site_f1 + 0.3  # not the old rule
    assert combine_site_reports([site_report("val", None, 2)]) == {}


def test_the_best_round_has_the_top_summed_validation_macro_f1_ties_to_the_later():
    def round_with(number: int, matrix: list[int], weighted_f1: float) -> dict:
        return {"round": number,
                "validation": {"val_confusion_matrix": matrix, "val_macro_f1": weighted_f1}}

    rounds = [round_with(1, [9, 1, 1, 9], 0.99), round_with(2, [10, 0, 0, 10], 0.1),
              round_with(3, [10, 0, 0, 10], 0.2), round_with(4, [5, 5, 5, 5], 0.99)]
    assert selection_score(rounds[1]) == 1.0
    assert best_round(rounds)["round"] == 3
    assert selection_score({"round": 1, "validation": {}}) == -1.0
    with pytest.raises(ValueError):
        best_round([])


def test_a_malformed_report_is_left_out_not_the_pooling():
    good = report([0, 1], [0, 1])
    reports = [good, good, {**good, "val_confusion_matrix": [1, 2, 3]},
               {**good, "num-examples": -1}, {**good, "val_loss": "high"}, {"val_loss": 1.0}]
    assert usable_reports(reports) == [good, good]
    assert combine_site_reports(usable_reports(reports))["val_confusion_matrix"] == [2, 0, 0, 2]


def test_the_in_distribution_test_sums_the_sites_test_counts_by_centre():
    from server.recorder import in_distribution_test

    def tested(centre: str, matrix: list[int]) -> dict:
        return {"centre": centre, "test_confusion_matrix": matrix,
                "test_macro_f1": macro_f1(matrix), "num-examples": sum(matrix)}

    empty = {"centre": "empty", **site_report("test", None, 2)}
    result = in_distribution_test([tested("b", [3, 1, 0, 4]), tested("a", [2, 0, 0, 2]),
                                   {"centre": "broken", "num-examples": "many"}, empty],
                                  CLASSES)
    assert result["confusion_matrix"] == [[5, 1], [0, 6]] and result["num_examples"] == 12
    assert [(s["centre"], s["num_examples"]) for s in result["sites"]] == [("a", 4), ("b", 8)]
    assert result["macro_f1"] == pytest.approx(macro_f1([[5, 1], [0, 6]]))
    assert in_distribution_test([empty], CLASSES) is None
