"""Federated temperature scaling (Guo et al. 2017, "On calibration of modern neural networks").

Each site evaluates the negative log-likelihood of its validation logits divided by every
temperature of one fixed grid and reports the sums and its image count (numbers only, never
logits or labels). The NLL of the pooled validation set at temperature ``T`` is the sum of the
sites' sums, so the server's pick, the grid temperature with the smallest summed NLL, is exactly
the temperature a single site holding every validation image would pick on the same grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CURVE_MESSAGE = "evaluate.temperature_curve"  # the selected weights in, a site's curve out
CURVE_RECORD = "temperature-curve"  # the reply's MetricRecord: NllCurve.to_dict()
# Log-spaced from 0.25 to 8 (sharpening to strong softening), 5% apart.
TEMPERATURES: tuple[float, ...] = tuple(
    float(t) for t in np.exp(np.linspace(math.log(0.25), math.log(8.0), 72)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, stable for large logits."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def checked_temperature(value: Any, source: str = "temperature") -> float:
    """``value`` as a temperature (a finite positive number), or a ValueError naming
    ``source`` (a temperature a site receives comes from the server's message)."""
    if (isinstance(value, bool) or not isinstance(value, int | float | np.number)
            or not math.isfinite(value) or not value > 0):
        raise ValueError(f"{source}: expected a finite positive number, got {value!r}")
    return float(value)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / temperature)`` (N, C)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


@dataclass(frozen=True)
class NllCurve:
    """One site's summed validation NLL at each grid temperature, and its image count."""

    nll_sums: tuple[float, ...]
    count: int
    temperatures: tuple[float, ...] = TEMPERATURES

    def to_dict(self) -> dict[str, list[float] | int]:
        """Plain lists of floats and an int (a Flower ConfigRecord/MetricRecord carries them)."""
        return {"temperatures": list(self.temperatures), "nll_sums": list(self.nll_sums),
                "count": self.count}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], source: str = "temperature curve",
                  temperatures: Sequence[float] = TEMPERATURES) -> NllCurve:
        """Checked inverse of :meth:`to_dict`: the grid must be ``temperatures``, the sums
        finite and non-negative, the count a positive integer; errors name ``source``."""
        grid, sums, count = (record.get(key) for key in ("temperatures", "nll_sums", "count"))
        if not _is_numbers(grid, len(temperatures)) or not np.allclose(grid, temperatures):
            raise ValueError(f"{source}: field 'temperatures' must be the {len(temperatures)} "
                             "grid temperatures of common.calibration")
        if not _is_numbers(sums, len(temperatures)) or min(sums) < 0:
            raise ValueError(f"{source}: field 'nll_sums' must be {len(temperatures)} finite "
                             "non-negative numbers")
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count <= 0:
            raise ValueError(f"{source}: field 'count' must be a positive integer, got {count!r}")
        return cls(tuple(float(v) for v in sums), int(count), tuple(temperatures))


def _is_numbers(values: Any, length: int) -> bool:
    """Whether ``values`` is a sequence of ``length`` finite real numbers."""
    return (isinstance(values, Sequence | np.ndarray) and not isinstance(values, str | bytes)
            and len(values) == length
            and all(isinstance(v, int | float | np.number) and not isinstance(v, bool)
                    and math.isfinite(v) for v in values))


def nll_curve(logits: np.ndarray, labels: np.ndarray,
              temperatures: Sequence[float] = TEMPERATURES) -> NllCurve:
    """A site's :class:`NllCurve` from its validation logits (N, C) and labels (N,).

    Log-probabilities work as logits too (softmax is unchanged by a per-row shift).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
        raise ValueError(f"temperature curve needs logits (N, C) and N labels, got "
                         f"{logits.shape} and {labels.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("temperature curve: logits must be finite")
    rows = np.arange(len(labels))
    sums = tuple(float(-log_softmax(logits / t)[rows, labels].sum()) for t in temperatures)
    return NllCurve(sums, len(labels), tuple(temperatures))


def pooled_nll(curves: Sequence[NllCurve], temperature: float) -> float:
    """Mean NLL per image of the sites' pooled curves at ``temperature``, one of the grid's."""
    index = curves[0].temperatures.index(temperature)
    return float(sum(c.nll_sums[index] for c in curves) / sum(c.count for c in curves))


def pick_temperature(curves: Sequence[NllCurve]) -> float:
    """The grid temperature with the smallest NLL summed over the sites' curves."""
    if not curves:
        raise ValueError("no temperature curves to pick a temperature from")
    grids = {curve.temperatures for curve in curves}
    if len(grids) != 1:
        raise ValueError("temperature curves use different grids")
    total = np.sum([curve.nll_sums for curve in curves], axis=0)
    return float(curves[0].temperatures[int(np.argmin(total))])
