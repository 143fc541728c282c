"""Tests of the synthetic multi-clinic leukocyte generator."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common import synthetic
from common.synthetic import CLASSES, ClinicStyle, clinic_by_name, default_clinics, generate_clinic


def balanced(name: str) -> ClinicStyle:
    """A default clinic with every class equally likely."""
    return dataclasses.replace(clinic_by_name(name), class_mix=(1 / len(CLASSES),) * len(CLASSES))


def dark_fraction(images: np.ndarray) -> float:
    """Share of pixels much darker than their image's median: mostly nucleus and granules."""
    brightness = images.astype(np.float32).mean(axis=-1).reshape(len(images), -1)
    return float((brightness < 0.6 * np.median(brightness, axis=1, keepdims=True)).mean())


def colour_histograms(images: np.ndarray, bins: int = 8) -> np.ndarray:
    """Per-channel intensity histograms, (n, 3 * bins)."""
    return np.array([np.concatenate([np.histogram(image[..., channel], bins, (0, 256))[0]
                                     for channel in range(3)]) for image in images])


def test_same_seed_same_images_and_other_seed_differs() -> None:
    style = clinic_by_name("clinic-a")
    images, labels = generate_clinic(style, 6, 16, seed=3)
    again_images, again_labels = generate_clinic(style, 6, 16, seed=3)
    other_images, _ = generate_clinic(style, 6, 16, seed=4)
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    assert not np.array_equal(images, other_images)


def test_shapes_dtypes_and_ranges() -> None:
    images, labels = generate_clinic(clinic_by_name("clinic-b"), 10, 24, seed=0)
    assert images.shape == (10, 24, 24, 3) and images.dtype == np.uint8
    assert labels.shape == (10,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(CLASSES)
    assert 100 < images.mean() < 250 and images.std() > 10


def test_zero_images() -> None:
    images, labels = generate_clinic(clinic_by_name("clinic-a"), 0, 16, seed=0)
    assert images.shape == (0, 16, 16, 3) and labels.shape == (0,)


def test_class_frequencies_follow_the_mix() -> None:
    style = clinic_by_name("clinic-b")
    n = 1500
    _, labels = generate_clinic(style, n, 8, seed=1)
    observed = np.bincount(labels, minlength=len(CLASSES)) / n
    expected = np.asarray(style.class_mix)
    tolerance = 4 * np.sqrt(expected * (1 - expected) / n) + 0.005
    assert (np.abs(observed - expected) < tolerance).all(), (observed, expected)


def test_default_clinics_have_rare_classes_and_differing_mixes() -> None:
    mixes = np.array([style.class_mix for style in default_clinics()])
    assert len(mixes) == 4 and len({style.name for style in default_clinics()}) == 4
    np.testing.assert_allclose(mixes.sum(axis=1), 1.0)
    assert mixes.min() < 0.02
    eosinophil = mixes[:, CLASSES.index("eosinophil")]
    assert eosinophil.max() > 10 * eosinophil.min()


def test_clinics_differ_in_mean_colour() -> None:
    means = {style.name: generate_clinic(style, 24, 16, seed=0)[0].reshape(-1, 3).mean(axis=0)
             for style in default_clinics()}
    for first, second in itertools.combinations(means, 2):
        assert np.linalg.norm(means[first] - means[second]) > 4, (first, second)
    yellowish, bluish = means["clinic-b"], means["clinic-c"]
    assert yellowish[0] - yellowish[2] > bluish[0] - bluish[2] + 30


def test_wide_field_clinic_shows_smaller_cells() -> None:
    wide = min(default_clinics(), key=lambda style: style.cell_diameter)
    tight = max(default_clinics(), key=lambda style: style.cell_diameter)
    wide_dark = dark_fraction(generate_clinic(wide, 30, 24, seed=0)[0])
    tight_dark = dark_fraction(generate_clinic(tight, 30, 24, seed=0)[0])
    assert 0 < 2 * wide_dark < tight_dark


def test_classes_are_separable_within_a_clinic() -> None:
    images, labels = generate_clinic(balanced("clinic-a"), 250, 24, seed=0)
    features = colour_histograms(images)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(features[:175], labels[:175])
    assert model.score(features[175:], labels[175:]) > 0.6


def test_granules_darken_basophils_and_turn_eosinophils_orange() -> None:
    images, labels = generate_clinic(balanced("clinic-b"), 150, 24, seed=2)
    by_class = {name: images[labels == index] for index, name in enumerate(CLASSES)}
    assert dark_fraction(by_class["basophil"]) > dark_fraction(by_class["neutrophil"])
    blue = {name: class_images[..., 2].mean() for name, class_images in by_class.items()}
    assert blue["eosinophil"] < blue["neutrophil"]


def test_load_clinic_caches(tmp_path, monkeypatch) -> None:
    images, labels = synthetic.load_clinic("clinic-c", 16, tmp_path, n_images=5, seed=2)
    cached = list((tmp_path / "synthetic").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"

    def fail(*args, **kwargs):
        raise AssertionError("regenerated despite the cache")

    monkeypatch.setattr(synthetic, "generate_clinic", fail)
    again_images, again_labels = synthetic.load_clinic("clinic-c", 16, tmp_path, n_images=5,
                                                       seed=2)
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    with pytest.raises(AssertionError, match="regenerated"):
        synthetic.load_clinic("clinic-c", 16, tmp_path, n_images=5, seed=3)


def test_clinic_by_name_rejects_unknown_names() -> None:
    assert clinic_by_name("clinic-d").name == "clinic-d"
    with pytest.raises(ValueError, match=r"clinic-z.*clinic-a, clinic-b, clinic-c, clinic-d"):
        clinic_by_name("clinic-z")


def test_style_rejects_a_bad_class_mix() -> None:
    with pytest.raises(ValueError, match="class_mix"):
        dataclasses.replace(clinic_by_name("clinic-a"), class_mix=(0.5, 0.5, 0.5, 0.0, 0.0))
