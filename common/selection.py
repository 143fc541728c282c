"""One rule picks every run's round, and the site reports it reads.

A training site scores a model on one of its splits and reports aggregates only
(:func:`site_report`: the counts of its confusion matrix, the shares of its images per
confidence bin, its mean loss); :func:`combine_site_reports` pools the reports of several sites
so that no single site steers the result far: every site weighs at most as much as the median
site (:func:`capped_weights`), and the confidence histograms that calibrate the ``uncertain``
threshold are pooled so that no single site can lower it (:func:`calibration_pool`).
:func:`best_round` is the selection rule of every method, federated or not: the latest round
with the highest macro-F1 of the summed confusion matrices of the training sites' validation
splits, each site counted as at most the median site (a federated run's sites, a pooled run's
centres, a local model's own centre). No per-image data and no held-out label is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from common.metrics import confusion_metrics, uncertainty_threshold

SELECTED_BY = ("macro-F1 of the training sites' summed validation confusion matrices, each "
               "site counted as at most the median site")
WEIGHT_KEY = "num-examples"  # images behind a site report (Flower strategies' weight key)
SPLITS = ("val", "test")  # the splits a site scores on request (it trains on "train")
MATRIX_SUFFIX = "_confusion_matrix"
HISTOGRAM_SUFFIXES = ("_correct_by_confidence", "_wrong_by_confidence")


def site_report(split: str, metrics: dict | None, num_classes: int) -> dict:
    """What a site sends about ``split``: aggregates of :func:`common.pipeline.score`'s
    ``metrics`` (None for an empty split), keys prefixed with the split.

    ``<split>_confusion_matrix`` (counts, flattened row by row), ``<split>_macro_f1``,
    ``<split>_loss``, ``<split>_correct_by_confidence``/``<split>_wrong_by_confidence`` (shares
    of the split's images per confidence bin) and ``num-examples``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; a site scores one of {SPLITS}")
    if metrics is None:
        return {f"{split}_confusion_matrix": [0] * num_classes**2, WEIGHT_KEY: 0}
    count = metrics["num_examples"]
    histogram = metrics["confidence_histogram"]
    return {f"{split}_confusion_matrix": np.ravel(metrics["confusion_matrix"]).tolist(),
            f"{split}_macro_f1": metrics["macro_f1"], f"{split}_loss": metrics["loss"],
            f"{split}_correct_by_confidence": [c / count for c in histogram["correct"]],
            f"{split}_wrong_by_confidence": [c / count for c in histogram["wrong"]],
            WEIGHT_KEY: count}


def combine_site_reports(reports: Sequence[dict]) -> dict:
    """Several sites' reports as one, which no single site can steer far.

    ``*_confusion_matrix``: the counts summed (still flattened), with their macro-F1 under
    ``*_macro_f1``; ``*_robust_macro_f1`` (what selects the round): the macro-F1 of the sum in
    which each site's counts are scaled down to at most the median site's number of images
    (:func:`capped_weights`). ``*_correct_by_confidence``/``*_wrong_by_confidence``: the
    calibration pool of :func:`calibration_pool`. Every other number or list: averaged with
    the capped weights (keys a site lacks are averaged over the others). ``num-examples``:
    summed. Empty when no site scored an image. Reports must be checked first (the server's
    ``server.replies``): counts add up to ``num-examples``, shares sum to 1.
    """
    reports = [r for r in reports if r[WEIGHT_KEY] > 0]
    if not reports:
        return {}
    sizes = np.asarray([r[WEIGHT_KEY] for r in reports], dtype=np.float64)
    weights = capped_weights(sizes)
    combined: dict = {WEIGHT_KEY: int(sizes.sum())}
    for key in dict.fromkeys(k for r in reports for k in r if k != WEIGHT_KEY):
        present = [i for i, r in enumerate(reports) if key in r]
        values = np.asarray([reports[i][key] for i in present], dtype=np.float64)
        if key.endswith(MATRIX_SUFFIX):
            split = key.removesuffix(MATRIX_SUFFIX)
            combined[key] = values.sum(axis=0).astype(np.int64).tolist()
            combined[f"{split}_macro_f1"] = macro_f1(combined[key])
            scaled = (weights[present] / sizes[present]) @ values
            combined[f"{split}_robust_macro_f1"] = macro_f1(scaled)
        elif key.endswith(HISTOGRAM_SUFFIXES) or key.endswith("_macro_f1"):
            continue  # pooled below / computed from the counts above
        else:
            combined[key] = np.average(values, axis=0, weights=weights[present]).tolist()
    for key in [k for k in combined if k.endswith(MATRIX_SUFFIX)]:
        split = key.removesuffix(MATRIX_SUFFIX)
        correct, wrong = (f"{split}{suffix}" for suffix in HISTOGRAM_SUFFIXES)
        sent = [(r[correct], r[wrong], w) for r, w in zip(reports, weights, strict=True)
                if correct in r and wrong in r]
        if sent:
            combined[correct], combined[wrong] = calibration_pool(sent)
    return combined


def capped_weights(sizes: np.ndarray) -> np.ndarray:
    """Each site's weight in a pooled statistic: its images, capped at the lower median of
    the sites' (the smaller of the two middle ones): a site that claims more images than the
    others counts as much as the median site, so one site alone never outweighs the rest
    (two sites count equally; honest sites of similar size keep their own weights)."""
    return np.minimum(sizes, np.sort(sizes)[(len(sizes) - 1) // 2])


def calibration_pool(histograms: Sequence[tuple[Sequence[float], Sequence[float], float]],
                     ) -> tuple[list[float], list[float]]:
    """The pooled (correct, wrong) confidence histogram the ``uncertain`` threshold is
    calibrated on, from each site's (correct, wrong, weight).

    Each site's histogram is normalised to sum to 1 and weighted; of the pools of all sites but
    one (of the one site when there is only one), the pool whose threshold
    (``common.metrics.uncertainty_threshold``) is the highest: no single site can lower the
    threshold below what the others' predictions support, so none can make the exported model
    flag fewer predictions as uncertain. (A site can raise it, which flags more: the safe way.)
    """
    shares = [np.concatenate([correct, wrong]) / max(np.sum(correct) + np.sum(wrong), 1e-12)
              for correct, wrong, _ in histograms]
    weights = np.asarray([weight for _, _, weight in histograms], dtype=np.float64)
    leave_out = range(len(shares)) if len(shares) > 1 else [None]
    pools = []
    for left_out in leave_out:
        kept = [i for i in range(len(shares)) if i != left_out]
        pooled = np.average([shares[i] for i in kept], axis=0, weights=weights[kept])
        pools.append(np.split(pooled, 2))
    correct, wrong = max(pools, key=lambda p: uncertainty_threshold(*p)["threshold"])
    return correct.tolist(), wrong.tolist()


def square(counts: Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray:
    """Confusion counts as a square matrix (rows = true class), from a flattened one too
    (integer counts stay integers; scaled counts are floats)."""
    counts = np.asarray(counts)
    size = math.isqrt(counts.size)
    if size * size != counts.size:
        raise ValueError(f"{counts.size} confusion counts do not make a square matrix")
    return counts.reshape(size, size)


def macro_f1(counts: Sequence[int] | Sequence[Sequence[int]]) -> float:
    """Macro-F1 over the classes present in confusion counts (flattened or not)."""
    matrix = square(counts)
    return confusion_metrics(matrix, [str(i) for i in range(len(matrix))])["macro_f1"]


SELECTION_KEY = "val_robust_macro_f1"  # in a round's combined validation: what selects it


def selection_score(round_result: dict) -> float:
    """A round's ``val_robust_macro_f1`` (see :func:`combine_site_reports`); -1 without."""
    return round_result["validation"].get(SELECTION_KEY, -1.0)


def best_round(rounds: Sequence[dict]) -> dict:
    """The selection rule of every method: the latest round with the top
    :func:`selection_score`."""
    if not rounds:
        raise ValueError("no round to select from")
    return max(rounds, key=lambda r: (selection_score(r), r["round"]))
