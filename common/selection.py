"""One rule picks every run's round, and the site reports it reads.

A training site scores a model on one of its splits and reports aggregates only
(:func:`site_report`: the counts of its confusion matrix, the shares of its images per
confidence bin, its mean loss); :func:`combine_site_reports` pools the reports of several sites
(confusion counts summed, the rest averaged by images). :func:`best_round` is the selection
rule of every method, federated or not: the latest round with the highest macro-F1 of the
summed confusion matrices of the training sites' validation splits (a federated run's sites, a
pooled run's centres, a local model's own centre). No per-image data and no held-out label
is used.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from common.metrics import confusion_metrics

SELECTED_BY = "macro-F1 of the training sites' summed validation confusion matrices"
WEIGHT_KEY = "num-examples"  # images behind a site report (Flower strategies' weight key)
SPLITS = ("val", "test")  # the splits a site scores on request (it trains on "train")


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
    """Several sites' reports as one: ``*_confusion_matrix`` summed (still flattened), its
    macro-F1 under the matching ``*_macro_f1``, every other number or list averaged weighted by
    the sites' images (keys a site lacks are averaged over the others); ``num-examples``
    summed. Empty when no site scored an image."""
    weights = np.asarray([r[WEIGHT_KEY] for r in reports], dtype=np.float64)
    if not reports or weights.sum() <= 0:
        return {}
    combined: dict = {WEIGHT_KEY: int(weights.sum())}
    for key in dict.fromkeys(k for r in reports for k in r if k != WEIGHT_KEY):
        present = [(r[key], w) for r, w in zip(reports, weights, strict=True) if key in r]
        values = np.asarray([v for v, _ in present], dtype=np.float64)
        if key.endswith("_confusion_matrix"):
            combined[key] = values.sum(axis=0).astype(np.int64).tolist()
        elif sum(w for _, w in present) > 0:
            average = np.average(values, axis=0, weights=[w for _, w in present])
            combined[key] = average.tolist()
    for key in [k for k in combined if k.endswith("_confusion_matrix")]:
        combined[key.replace("_confusion_matrix", "_macro_f1")] = macro_f1(combined[key])
    return combined


def square(counts: Sequence[int] | Sequence[Sequence[int]]) -> np.ndarray:
    """Confusion counts as a square matrix (rows = true class), from a flattened one too."""
    counts = np.asarray(counts, dtype=np.int64)
    size = math.isqrt(counts.size)
    if size * size != counts.size:
        raise ValueError(f"{counts.size} confusion counts do not make a square matrix")
    return counts.reshape(size, size)


def usable_reports(reports: Sequence[dict]) -> list[dict]:
    """The reports :func:`combine_site_reports` can pool: a non-negative number of images,
    numbers or lists of numbers only, each list as long as most sites' (a broken or malicious
    site's report is left out, not the round)."""
    def numeric(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    typed = [r for r in reports if numeric(r.get(WEIGHT_KEY)) and r[WEIGHT_KEY] >= 0
             and all(numeric(v) or (isinstance(v, list) and all(map(numeric, v)))
                     for v in r.values())]
    lengths = Counter((k, len(v)) for r in typed for k, v in r.items() if isinstance(v, list))
    usual = {key: max((n for k, n in lengths if k == key), key=lambda n: lengths[key, n])
             for key, _ in lengths}
    return [r for r in typed
            if all(len(v) == usual[k] for k, v in r.items() if isinstance(v, list))]


def macro_f1(counts: Sequence[int] | Sequence[Sequence[int]]) -> float:
    """Macro-F1 over the classes present in confusion counts (flattened or not)."""
    matrix = square(counts)
    return confusion_metrics(matrix, [str(i) for i in range(len(matrix))])["macro_f1"]


def selection_score(round_result: dict) -> float:
    """Macro-F1 of a round's summed validation confusion matrix; -1 without one."""
    matrix = round_result["validation"].get("val_confusion_matrix")
    return macro_f1(matrix) if matrix else -1.0


def best_round(rounds: Sequence[dict]) -> dict:
    """The selection rule of every method: the latest round with the top
    :func:`selection_score`."""
    if not rounds:
        raise ValueError("no round to select from")
    return max(rounds, key=lambda r: (selection_score(r), r["round"]))
