"""What the server and the held-out evaluator site exchange.

In deployment the held-out centre scores the global model at its own site
(``client.evaluator``) with :func:`common.pipeline.score_held_out`, the function the server
uses in simulation, and sends the result as JSON text. The server rebuilds it with
:func:`decode_held_out`, which checks every field against the run's classes (names, types,
ranges, the confusion matrix's shape and totals) before anything reaches the report: a
faulty or hostile evaluator can neither break the report nor put its own text into it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from common.metrics import CONFIDENCE_BINS

ROLE_KEY = "role"  # node_config key set by `cytofed site --role`
TRAIN, EVALUATOR = "train", "evaluator"
ROLES = (TRAIN, EVALUATOR)
HELD_OUT_MESSAGE = "evaluate.held_out"  # global weights in, held-out metrics out
ROLE_QUERY = "query.role"  # the node's role and centre name

MAX_BYTES = 1_000_000  # a five-class result is about 3 kB
RATES = ("macro_f1", "balanced_accuracy", "accuracy", "ece")
METRIC_KEYS = frozenset({*RATES, "loss", "num_examples", "per_class_f1", "confusion_matrix",
                         "reliability", "confidence_histogram"})
RESULT_KEYS = frozenset({"held_out", "held_out_bn_adapted"})
BIN_KEYS = frozenset({"lower", "upper", "count", "confidence", "accuracy"})
MAX_RELIABILITY_BINS = 100


def encode_held_out(result: dict[str, dict | None]) -> str:
    """JSON text of ``{"held_out": metrics, "held_out_bn_adapted": metrics or None}``."""
    return json.dumps(result, allow_nan=False, separators=(",", ":"))


def decode_held_out(text: str, classes: Sequence[str]) -> dict[str, dict | None]:
    """The result of :func:`encode_held_out`, checked field by field against ``classes``.

    Raises ValueError naming the first field that is not what the server computes.
    """
    if not isinstance(text, str) or len(text) > MAX_BYTES:
        raise ValueError(f"held-out metrics: expected JSON text of at most {MAX_BYTES} bytes")
    try:
        result = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as error:
        raise ValueError(f"held-out metrics: not valid JSON ({error})") from error
    _require(isinstance(result, dict) and set(result) == RESULT_KEYS, "held-out metrics",
             f"an object with keys {sorted(RESULT_KEYS)}")
    adapted = result["held_out_bn_adapted"]
    return {"held_out": _metrics(result["held_out"], classes, "held_out"),
            "held_out_bn_adapted": None if adapted is None
            else _metrics(adapted, classes, "held_out_bn_adapted")}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _require(condition: bool, field: str, expected: str) -> None:
    if not condition:
        raise ValueError(f"held-out metrics field {field!r}: expected {expected}")


def _count(value: Any, field: str) -> int:
    _require(type(value) is int and value >= 0, field, "a count (integer >= 0)")
    return value


def _rate(value: Any, field: str) -> float:
    _require(type(value) in (int, float) and math.isfinite(value) and 0 <= value <= 1, field,
             "a number in [0, 1]")
    return float(value)


def _loss(value: Any, field: str) -> float:
    _require(type(value) in (int, float) and math.isfinite(value) and value >= 0, field,
             "a finite number >= 0")
    return float(value)


def _counts(value: Any, length: int, field: str) -> list[int]:
    _require(isinstance(value, list) and len(value) == length, field, f"{length} counts")
    return [_count(v, field) for v in value]


def _metrics(value: Any, classes: Sequence[str], field: str) -> dict:
    _require(isinstance(value, dict) and set(value) == METRIC_KEYS, field,
             f"an object with keys {sorted(METRIC_KEYS)}")
    n = _count(value["num_examples"], f"{field}.num_examples")
    _require(n > 0, f"{field}.num_examples", "at least one image")
    per_class = value["per_class_f1"]
    _require(isinstance(per_class, dict) and list(per_class) == list(classes),
             f"{field}.per_class_f1", f"one entry per class {list(classes)}, in that order")
    matrix_field = f"{field}.confusion_matrix"
    matrix = value["confusion_matrix"]
    _require(isinstance(matrix, list) and len(matrix) == len(classes), matrix_field,
             f"{len(classes)} rows")
    matrix = [_counts(row, len(classes), matrix_field) for row in matrix]
    _require(sum(map(sum, matrix)) == n, matrix_field, f"counts summing to num_examples {n}")
    histogram = value["confidence_histogram"]
    histogram_field = f"{field}.confidence_histogram"
    _require(isinstance(histogram, dict) and set(histogram) == {"correct", "wrong"},
             histogram_field, "an object with keys 'correct' and 'wrong'")
    histogram = {key: _counts(histogram[key], CONFIDENCE_BINS, histogram_field)
                 for key in ("correct", "wrong")}
    _require(sum(histogram["correct"]) + sum(histogram["wrong"]) == n, histogram_field,
             f"counts summing to num_examples {n}")
    bins = value["reliability"]
    bins_field = f"{field}.reliability"
    _require(isinstance(bins, list) and len(bins) <= MAX_RELIABILITY_BINS
             and all(isinstance(b, dict) and set(b) == BIN_KEYS for b in bins), bins_field,
             f"at most {MAX_RELIABILITY_BINS} bins with keys {sorted(BIN_KEYS)}")
    return {
        **{key: _rate(value[key], f"{field}.{key}") for key in RATES},
        "loss": _loss(value["loss"], f"{field}.loss"),
        "num_examples": n,
        "per_class_f1": {name: None if f1 is None else _rate(f1, f"{field}.per_class_f1")
                         for name, f1 in per_class.items()},
        "confusion_matrix": matrix,
        "reliability": [{"lower": _rate(b["lower"], bins_field),
                         "upper": _rate(b["upper"], bins_field),
                         "count": _count(b["count"], bins_field),
                         "confidence": _rate(b["confidence"], bins_field),
                         "accuracy": _rate(b["accuracy"], bins_field)} for b in bins],
        "confidence_histogram": histogram,
    }
