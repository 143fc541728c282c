"""Federated temperature scaling: the sites' summed loss curves pick the pooled optimum."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from common.calibration import (
    TEMPERATURES,
    NllCurve,
    apply_temperature,
    log_softmax,
    nll_curve,
    pick_temperature,
)
from common.metrics import expected_calibration_error


def toy_site(n: int, temperature: float, spread: float, seed: int,
             classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / temperature): calibrated at
    ``temperature``, overconfident as given when it is above 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, spread, (n, classes))
    probabilities = apply_temperature(logits, temperature)
    labels = np.array([rng.choice(classes, p=p) for p in probabilities])
    return logits, labels


def pooled_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits / temperature)[np.arange(len(labels)), labels].sum())


def test_sites_curves_pick_the_pooled_optimum() -> None:
    sites = [toy_site(1500, 2.5, 4.0, seed=1), toy_site(500, 0.8, 1.5, seed=2),
             toy_site(300, 1.5, 3.0, seed=3)]
    curves = [nll_curve(logits, labels) for logits, labels in sites]
    picked = pick_temperature(curves)
    logits = np.concatenate([s[0] for s in sites])
    labels = np.concatenate([s[1] for s in sites])
    on_grid = min(TEMPERATURES, key=lambda t: pooled_nll(logits, labels, t))
    assert picked == on_grid
    continuous = minimize_scalar(lambda log_t: pooled_nll(logits, labels, math.exp(log_t)),
                                 bounds=(math.log(0.25), math.log(8)), method="bounded")
    assert abs(math.log(picked) - continuous.x) <= math.log(TEMPERATURES[1] / TEMPERATURES[0])
    # Not what averaging the sites' own choices would give: the sites differ.
    own = [pick_temperature([curve]) for curve in curves]
    assert len({round(t, 2) for t in own}) == 3
    assert abs(picked - np.mean(own)) > 0.1


def test_scaling_calibrates_an_overconfident_model() -> None:
    logits, labels = toy_site(4000, 2.0, 4.0, seed=4)
    temperature = pick_temperature([nll_curve(logits, labels)])
    assert 1.7 < temperature < 2.4
    before = expected_calibration_error(labels, apply_temperature(logits, 1.0))
    after = expected_calibration_error(labels, apply_temperature(logits, temperature))
    assert after < 0.5 * before


def test_log_probabilities_work_as_logits() -> None:
    logits, labels = toy_site(200, 1.5, 3.0, seed=5)
    from_logits = nll_curve(logits, labels)
    from_log_probs = nll_curve(np.log(apply_temperature(logits, 1.0)), labels)
    np.testing.assert_allclose(from_log_probs.nll_sums, from_logits.nll_sums, rtol=1e-9)


def test_curve_round_trips_as_plain_values() -> None:
    curve = nll_curve(*toy_site(50, 1.0, 2.0, seed=6))
    record = curve.to_dict()
    assert isinstance(record["count"], int) and record["count"] == 50
    assert NllCurve.from_dict(record) == curve


GOOD = nll_curve(*toy_site(20, 1.0, 2.0, seed=7)).to_dict()
SUMS = list(GOOD["nll_sums"])


@pytest.mark.parametrize(("field", "value"), [
    ("temperatures", list(TEMPERATURES[:-1])),
    ("temperatures", [2 * t for t in TEMPERATURES]),
    ("nll_sums", [math.nan, *SUMS[1:]]),
    ("nll_sums", [-1.0, *SUMS[1:]]),
    ("nll_sums", SUMS[:10]),
    ("count", 0),
    ("count", True),
    ("count", 2.5),
])
def test_malformed_curves_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"site 3: field '{field}'"):
        NllCurve.from_dict({**GOOD, field: value}, source="site 3")


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="logits"):
        nll_curve(np.zeros((3, 4)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="finite"):
        nll_curve(np.full((2, 3), np.inf), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="no temperature curves"):
        pick_temperature([])
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(np.zeros((1, 2)), 0.0)
