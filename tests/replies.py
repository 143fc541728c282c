"""Well-formed site replies, as the ClientApp builds them, for tests of the server's checks."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common.metrics import CONFIDENCE_BINS
from common.selection import site_report
from server.replies import Expected
from server.strategies import state_to_record

CENTRES = ("lab-a", "lab-b", "lab-c", "lab-d", "lab-e", "lab-f")
EXPECTED = Expected(num_classes=2, centres=frozenset(CENTRES), held_out="held-out",
                    max_images=10_000)


def train_content(state: dict[str, np.ndarray], examples: int = 10, centre: str = "lab-a",
                  loss: float = 1.0, class_counts: list[int] | None = None) -> RecordDict:
    """A training reply's content: the update, its metrics and the site's record."""
    site = ConfigRecord({"centre": centre})
    if class_counts is not None:
        site["class-counts"] = class_counts
    arrays = state_to_record(state)
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({
        "train_loss": loss, "images_per_second": 100.0, "train_seconds": 0.5, "local_steps": 3,
        "num-examples": examples, "update-bytes": arrays.count_bytes()}), "site": site})


def split_metrics(split: str, matrix: list[int], correct: float = 0.9,
                  loss: float = 0.5) -> dict:
    """A site's report on ``split`` with confusion counts ``matrix`` (2 classes): a share
    ``correct`` of its images right with confidence 0.95-1, the rest wrong at 0.5-0.55."""
    images = sum(matrix)
    if images == 0:
        return site_report(split, None, 2)
    right = [0] * CONFIDENCE_BINS
    wrong = [0] * CONFIDENCE_BINS
    right[-1], wrong[10] = round(correct * images), images - round(correct * images)
    return site_report(split, {"num_examples": images, "confusion_matrix": matrix,
                               "macro_f1": 0.5, "loss": loss,
                               "confidence_histogram": {"correct": right, "wrong": wrong}}, 2)


def report_content(split: str, matrix: list[int], centre: str = "lab-a",
                   **settings: float) -> RecordDict:
    """An evaluation reply's content."""
    return RecordDict({"metrics": MetricRecord({**split_metrics(split, matrix, **settings),
                                                "eval_seconds": 0.1}),
                       "site": ConfigRecord({"centre": centre})})


def answer(message: Message, content: RecordDict) -> Message:
    return Message(content=content, reply_to=message)
