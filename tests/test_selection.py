"""The one selection rule and the site reports it reads (counts only)."""

import numpy as np
import pytest

from common.metrics import classification_metrics, uncertainty_threshold
from common.selection import (
    best_round,
    calibration_pool,
    capped_weights,
    combine_site_reports,
    macro_f1,
    selection_score,
    site_report,
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


def test_the_best_round_has_the_top_robust_validation_macro_f1_ties_to_the_later():
    def round_with(number: int, *site_matrices: list[int]) -> dict:
        reports = [{"val_confusion_matrix": m, "num-examples": sum(m)} for m in site_matrices]
        return {"round": number, "validation": combine_site_reports(reports)}

    rounds = [round_with(1, [9, 1, 1, 9]), round_with(2, [10, 0, 0, 10]),
              round_with(3, [10, 0, 0, 10]), round_with(4, [5, 5, 5, 5])]
    assert selection_score(rounds[1]) == 1.0
    assert best_round(rounds)["round"] == 3
    assert selection_score({"round": 1, "validation": {}}) == -1.0
    with pytest.raises(ValueError):
        best_round([])


def test_one_site_claiming_many_images_counts_as_the_median_site():
    assert capped_weights(np.array([100.0, 120, 140])).tolist() == [100, 120, 120]
    assert capped_weights(np.array([10.0, 1e6])).tolist() == [10, 10]
    assert capped_weights(np.array([5.0])).tolist() == [5]
    # Two honest sites score round 1 well and round 2 badly; a third claims a million
    # perfect images in round 2 only. Summed as they are, round 2 would be selected.
    honest_good, honest_bad, liar = [45, 5, 5, 45], [30, 20, 20, 30], [500_000, 0, 0, 500_000]
    rounds = [{"round": 1, "validation": combine_site_reports([
                  {"val_confusion_matrix": m, "num-examples": sum(m)}
                  for m in (honest_good, honest_good, [40, 10, 10, 40])])},
              {"round": 2, "validation": combine_site_reports([
                  {"val_confusion_matrix": m, "num-examples": sum(m)}
                  for m in (honest_bad, honest_bad, liar)])}]
    assert rounds[1]["validation"]["val_macro_f1"] > rounds[0]["validation"]["val_macro_f1"]
    assert best_round(rounds)["round"] == 1
    assert rounds[1]["validation"]["val_confusion_matrix"] == [500_060, 40, 40, 500_060]


def histogram(correct: dict[int, float], wrong: dict[int, float]) -> tuple[list, list]:
    return ([correct.get(b, 0.0) for b in range(20)], [wrong.get(b, 0.0) for b in range(20)])


def test_no_single_site_can_lower_the_uncertain_threshold():
    # Two honest sites: right at confidence >= 0.9, wrong (6%) at 0.6-0.65.
    honest = histogram({18: 0.94}, {12: 0.06})
    # A third claims every prediction right at confidence 0-0.05: pooled as they are, the
    # error rate over all predictions drops to 4% and nothing would be flagged uncertain.
    liar = histogram({0: 1.0}, {})
    plain = [np.mean([h[k] for h in (honest, honest, liar)], axis=0) for k in (0, 1)]
    assert uncertainty_threshold(*plain)["threshold"] == 0.0
    pooled = calibration_pool([(*honest, 1.0), (*honest, 1.0), (*liar, 1.0)])
    assert uncertainty_threshold(*pooled)["threshold"] == pytest.approx(0.65)
    # A site can raise the threshold (more predictions flagged): the safe way.
    alarmist = histogram({}, {19: 1.0})
    raised = calibration_pool([(*honest, 1.0), (*honest, 1.0), (*alarmist, 1.0)])
    assert uncertainty_threshold(*raised)["threshold"] == 1.0
    assert calibration_pool([(*honest, 3.0)]) == (list(honest[0]), list(honest[1]))


def test_each_sites_histogram_is_normalised_before_pooling():
    counts_like = histogram({18: 90.0}, {12: 10.0})  # counts, not shares
    pooled = calibration_pool([(*counts_like, 1.0), (*histogram({18: 0.9}, {12: 0.1}), 1.0)])
    assert sum(pooled[0]) + sum(pooled[1]) == pytest.approx(1.0)


def test_the_in_distribution_test_sums_the_sites_test_counts_by_centre():
    from server.recorder import in_distribution_test

    def tested(centre: str, matrix: list[int]) -> dict:
        return {"centre": centre, "test_confusion_matrix": matrix,
                "test_macro_f1": macro_f1(matrix), "num-examples": sum(matrix)}

    empty = {"centre": "empty", **site_report("test", None, 2)}
    result = in_distribution_test([tested("b", [3, 1, 0, 4]), tested("a", [2, 0, 0, 2]),
                                   empty], CLASSES)
    assert result["confusion_matrix"] == [[5, 1], [0, 6]] and result["num_examples"] == 12
    assert [(s["centre"], s["num_examples"]) for s in result["sites"]] == [("a", 4), ("b", 8)]
    assert result["macro_f1"] == pytest.approx(macro_f1([[5, 1], [0, 6]]))
    assert in_distribution_test([empty], CLASSES) is None
