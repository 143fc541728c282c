"""Stain statistics, their validation and transport, re-staining and stain normalisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmenter,
    channel_stats,
    normalise,
    to_model_input,
)
from common.model_input import ModelInput
from common.stain import (
    CONCENTRATION_RANGE,
    LAB_STD_RANGE,
    REFERENCE_STYLE,
    RESTAIN_METHODS,
    ReinhardNormaliser,
    Restainer,
    StainStats,
    build_stain_normaliser,
    lab_to_rgb,
    pack_styles,
    rgb_to_lab,
    site_stain_stats,
    style_pool,
    unpack_styles,
)
from common.synthetic import clinic_by_name, generate_clinic

SIZE = 32


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit_rows(rows: list[list[float]]) -> np.ndarray:
    matrix = np.asarray(rows, dtype=np.float64)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def stained_images(stains: np.ndarray, n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, S, S, 3) Beer-Lambert images of two stains (rows of ``stains``) on a white
    background: a disc of mostly the first stain, a ring of mostly the second, some pure pixels
    of each; also the true concentrations (n, S, S, 2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    radius = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    concentrations = np.zeros((n, SIZE, SIZE, 2))
    for image in concentrations:
        first = radius < SIZE / 5
        second = (radius >= SIZE / 5) & (radius < SIZE / 2.5)
        image[first, 0] = rng.uniform(0.8, 2.0, first.sum())
        image[first, 1] = rng.uniform(0.0, 0.6, first.sum()) * (rng.random(first.sum()) > 0.3)
        image[second, 1] = rng.uniform(0.8, 2.0, second.sum())
        image[second, 0] = rng.uniform(0.0, 0.6, second.sum()) * (rng.random(second.sum()) > 0.3)
    density = concentrations @ stains
    return (np.exp(-density) * 255).round().astype(np.uint8), concentrations


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1)))


# Haematoxylin absorbs more red than eosin; the second case gives the stains the other way round.
KNOWN = [unit_rows([[0.60, 0.75, 0.28], [0.20, 0.90, 0.38]]),
         unit_rows([[0.15, 0.85, 0.50], [0.70, 0.65, 0.30]])]


@pytest.mark.parametrize("stains", KNOWN)
def test_stain_matrix_of_a_known_stain_is_recovered(stains: np.ndarray) -> None:
    images, concentrations = stained_images(stains)
    stats = site_stain_stats(images)
    estimate = np.asarray(stats.stain_matrix)
    haematoxylin, eosin = (stains if stains[0, 0] > stains[1, 0] else stains[::-1])
    assert angle_deg(estimate[0], haematoxylin) < 2.0
    assert angle_deg(estimate[1], eosin) < 2.0
    true_top = np.quantile(concentrations.reshape(-1, 2), 0.99, axis=0)
    if stains[0, 0] < stains[1, 0]:
        true_top = true_top[::-1]
    np.testing.assert_allclose(stats.max_concentrations, true_top, rtol=0.1)


def test_lab_matches_reference_values_and_round_trips() -> None:
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
                       dtype=torch.float64)
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20],
                             [32.30, 79.19, -107.86]], dtype=torch.float64)
    assert torch.allclose(rgb_to_lab(rgb), expected, atol=0.05)
    images = torch.rand(3, 3, 8, 8, generator=seeded(0), dtype=torch.float64)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(images)), images, atol=1e-9)


def test_stats_of_blank_images_are_refused() -> None:
    with pytest.raises(ValueError, match="no stain matrix"):
        site_stain_stats(np.full((4, SIZE, SIZE, 3), 250, np.uint8))
    with pytest.raises(ValueError, match="uint8 images"):
        site_stain_stats(np.zeros((4, SIZE, SIZE), np.uint8))


@pytest.fixture(scope="module")
def clinics() -> dict[str, np.ndarray]:
    """Two synthetic clinics with different stains: uint8 (16, 32, 32, 3) each."""
    return {name: generate_clinic(clinic_by_name(name), 16, SIZE, seed=0)[0]
            for name in ("clinic-a", "clinic-c")}


@pytest.fixture(scope="module")
def styles(clinics: dict[str, np.ndarray]) -> dict[str, StainStats]:
    return {name: site_stain_stats(images) for name, images in clinics.items()}


def test_stats_travel_as_plain_floats(styles: dict[str, StainStats]) -> None:
    from flwr.app import ConfigRecord

    stats = styles["clinic-a"]
    record = stats.to_dict()
    assert all(isinstance(v, float) for values in record.values() for v in values)
    assert StainStats.from_dict(json.loads(json.dumps(record))) == stats
    assert StainStats.from_dict(dict(ConfigRecord(record))) == stats
    pool = style_pool(styles)
    assert unpack_styles(dict(ConfigRecord(pack_styles(pool)))) == pool


def test_style_pool_holds_the_other_sites_in_name_order(styles: dict[str, StainStats]) -> None:
    shared = {"zeta": styles["clinic-a"], "alpha": styles["clinic-c"], "own": REFERENCE_STYLE}
    assert style_pool(shared, "own") == [styles["clinic-c"], styles["clinic-a"]]
    assert style_pool(shared) == [styles["clinic-c"], REFERENCE_STYLE, styles["clinic-a"]]


GOOD = REFERENCE_STYLE.to_dict()
BAD_FIELDS = [
    ("stain_matrix", [math.nan, *GOOD["stain_matrix"][1:]]),
    ("stain_matrix", [math.inf, *GOOD["stain_matrix"][1:]]),
    ("stain_matrix", GOOD["stain_matrix"][:5]),
    ("stain_matrix", "0.5 0.8 0.1 0.1 0.9 0.3"),
    ("stain_matrix", [2 * v for v in GOOD["stain_matrix"]]),  # not unit vectors
    ("stain_matrix", [-0.6, 0.8, 0.0, 0.152, 0.952, 0.267]),  # negative absorption
    ("stain_matrix", GOOD["stain_matrix"][:3] * 2),  # the same vector twice
    ("max_concentrations", [0.0, 1.0]),
    ("max_concentrations", [1e9, 1.0]),
    ("max_concentrations", [True, 1.0]),
    ("lab_mean", [150.0, 0.0, 0.0]),
    ("lab_std", [0.0, 10.0, 10.0]),
    ("lab_std", [math.nan, 10.0, 10.0]),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_malformed_stats_are_refused_naming_site_and_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"site 7: field '{field}'"):
        StainStats.from_dict({**GOOD, field: value}, source="site 7")


def test_missing_or_unknown_fields_are_refused() -> None:
    with pytest.raises(ValueError, match=r"site 7: .*missing \['lab_std'\]"):
        StainStats.from_dict({k: v for k, v in GOOD.items() if k != "lab_std"}, "site 7")
    with pytest.raises(ValueError, match=r"unknown \['pixels'\]"):
        StainStats.from_dict({**GOOD, "pixels": [1.0]}, "site 7")
    with pytest.raises(ValueError, match="numbers per style"):
        unpack_styles({**pack_styles([REFERENCE_STYLE] * 2), "lab_mean": [50.0, 0.0]})


def extreme_style(angle_deg: float, concentration: float, lab_std: float) -> StainStats:
    """A valid style at the edge of every checked range."""
    first = np.array([1.0, 0.0, 0.0])
    second = np.array([math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg)), 0])
    return StainStats(stain_matrix=(tuple(first), tuple(second)),
                      max_concentrations=(concentration, concentration),
                      lab_mean=(100.0, -128.0, 128.0), lab_std=(lab_std,) * 3).validate()


@pytest.mark.parametrize("method", RESTAIN_METHODS)
def test_extreme_but_valid_styles_give_finite_images(method: str,
                                                     clinics: dict[str, np.ndarray]) -> None:
    x = torch.from_numpy(clinics["clinic-a"]).permute(0, 3, 1, 2).float() / 255
    x[0] = 0.0  # black and white images too
    x[1] = 1.0
    own = extreme_style(5.01, CONCENTRATION_RANGE[0], LAB_STD_RANGE[0])
    target = extreme_style(90.0, CONCENTRATION_RANGE[1], LAB_STD_RANGE[1])
    out = Restainer(own, [target], method, probability=1.0)(x, seeded(0))
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def distance(a: StainStats, b: StainStats, method: str) -> float:
    """Degrees between stain vectors (macenko) or CIELAB distance of means and spreads."""
    if method == "macenko":
        return sum(angle_deg(np.array(u), np.array(v))
                   for u, v in zip(a.stain_matrix, b.stain_matrix, strict=True))
    return float(np.linalg.norm(np.subtract(a.lab_mean, b.lab_mean))
                 + np.linalg.norm(np.subtract(a.lab_std, b.lab_std)))


@pytest.mark.parametrize("method", RESTAIN_METHODS)
def test_restaining_moves_statistics_towards_the_target(
        method: str, clinics: dict[str, np.ndarray], styles: dict[str, StainStats]) -> None:
    source, target = styles["clinic-a"], styles["clinic-c"]
    x = torch.from_numpy(clinics["clinic-a"]).permute(0, 3, 1, 2).float() / 255
    out = Restainer(source, [target], method, probability=1.0)(x, seeded(0))
    moved = site_stain_stats((out * 255).round().byte().permute(0, 2, 3, 1).numpy())
    before = distance(source, target, method)
    assert distance(moved, target, method) < 0.5 * before
    assert distance(moved, source, method) > 0.5 * before


def test_reinhard_restaining_to_the_own_style_is_identity(
        clinics: dict[str, np.ndarray], styles: dict[str, StainStats]) -> None:
    x = torch.from_numpy(clinics["clinic-a"]).permute(0, 3, 1, 2).float() / 255
    own = styles["clinic-a"]
    out = Restainer(own, [own], "reinhard", probability=1.0)(x, seeded(0))
    assert torch.allclose(out, x, atol=1e-4)


def test_restaining_probability_and_randomness(clinics: dict[str, np.ndarray],
                                               styles: dict[str, StainStats]) -> None:
    x = torch.from_numpy(clinics["clinic-a"]).permute(0, 3, 1, 2).float() / 255
    own, target = styles["clinic-a"], styles["clinic-c"]
    assert torch.equal(Restainer(own, [target], probability=0.0)(x, seeded(0)), x)
    half = Restainer(own, [target, REFERENCE_STYLE], probability=0.5)
    first = half(x, seeded(1))
    assert torch.equal(first, half(x, seeded(1)))
    assert not torch.equal(first, half(x, seeded(2)))
    changed = (first - x).flatten(1).abs().amax(dim=1) > 0.02
    assert 0 < int(changed.sum()) < len(x)
    # Both styles of the pool are drawn: restained images fall into two colour groups.
    full = Restainer(own, [target, REFERENCE_STYLE], probability=1.0)
    out = full(x, seeded(3))
    to_target = Restainer(own, [target], probability=1.0)(x)
    to_reference = Restainer(own, [REFERENCE_STYLE], probability=1.0)(x)
    is_target = torch.isclose(out, to_target).flatten(1).all(dim=1)
    is_reference = torch.isclose(out, to_reference).flatten(1).all(dim=1)
    assert bool((is_target ^ is_reference).all()) and is_target.any() and is_reference.any()


def test_restainer_refuses_bad_arguments(styles: dict[str, StainStats]) -> None:
    own = styles["clinic-a"]
    with pytest.raises(ValueError, match="at least one style"):
        Restainer(own, [])
    with pytest.raises(ValueError, match="'vahadane'"):
        Restainer(own, [own], method="vahadane")
    with pytest.raises(ValueError, match="probability"):
        Restainer(own, [own], probability=1.5)
    forged = StainStats(stain_matrix=((1.0, 0.0, 0.0), (1.0, 0.0, 0.0)),
                        max_concentrations=(1.0, 1.0), lab_mean=(50.0, 0.0, 0.0),
                        lab_std=(10.0, 10.0, 10.0))
    with pytest.raises(ValueError, match="style 1 of the pool: field 'stain_matrix'"):
        Restainer(own, [own, forged])


def lab_image_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lab = rgb_to_lab(x.double())
    return lab.mean(dim=(-2, -1)), lab.std(dim=(-2, -1))


def test_reinhard_normalisation_matches_the_reference_and_removes_a_colour_cast(
        clinics: dict[str, np.ndarray]) -> None:
    x = torch.from_numpy(clinics["clinic-c"]).permute(0, 3, 1, 2).float() / 255
    normaliser = ReinhardNormaliser()
    out = normaliser(x)
    mean, std = lab_image_stats(out)
    assert torch.allclose(mean, torch.tensor(REFERENCE_STYLE.lab_mean).double(), atol=2.0)
    # Clamping to the sRGB gamut narrows the spread a little.
    assert torch.allclose(std, torch.tensor(REFERENCE_STYLE.lab_std).double(), rtol=0.15)
    # The same images under another stain cast normalise to (nearly) the same images.
    lab = rgb_to_lab(x)
    cast = lab_to_rgb(lab * torch.tensor([0.9, 1.2, 0.8]).view(1, 3, 1, 1)
                      + torch.tensor([3.0, -4.0, 6.0]).view(1, 3, 1, 1))
    assert (cast - x).abs().mean() > 0.03
    assert (normaliser(cast) - out).abs().mean() < 0.01


def test_normalisation_is_deterministic_on_uint8_and_float_batches(
        clinics: dict[str, np.ndarray]) -> None:
    batch = torch.from_numpy(clinics["clinic-a"][:4])
    normaliser = build_stain_normaliser("reinhard")
    out = normaliser(batch)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out, normaliser(batch))
    floats = normaliser(batch.permute(0, 3, 1, 2).float() / 255)
    assert floats.dtype == torch.float32
    assert (floats * 255 - out.permute(0, 3, 1, 2).float()).abs().max() <= 0.5 + 1e-3


def test_training_and_prediction_apply_the_same_normalisation(
        clinics: dict[str, np.ndarray]) -> None:
    """Placed once (``ModelInput.place``), the same normalised images reach the training
    augmenter and the prediction path."""
    images = clinics["clinic-a"][:4]
    inputs = ModelInput(IMAGENET_MEAN, IMAGENET_STD, "reinhard")
    placed = inputs.place(images, torch.device("cpu"))
    assert torch.equal(placed, ReinhardNormaliser()(torch.from_numpy(images)))
    predicted = inputs.normalise(placed)
    trained = Augmenter([], mean=inputs.mean, std=inputs.std)(placed, seeded(0))
    assert torch.equal(predicted, trained)
    assert not torch.allclose(predicted, to_model_input(torch.from_numpy(images)), atol=0.05)


def test_unknown_normaliser_is_named() -> None:
    assert build_stain_normaliser("none") is None
    with pytest.raises(ValueError, match=r"'macenko'.*none, reinhard"):
        build_stain_normaliser("macenko")


def test_augmenter_restains_with_the_batch_generator(clinics: dict[str, np.ndarray],
                                                    styles: dict[str, StainStats]) -> None:
    batch = torch.from_numpy(clinics["clinic-a"][:4])
    restainer = Restainer(styles["clinic-a"], [styles["clinic-c"]], probability=0.5)
    out = Augmenter([], restainer=restainer)(batch, seeded(0))
    restained = restainer(batch.permute(0, 3, 1, 2).float() / 255, seeded(0))
    expected = normalise(restained, channel_stats(IMAGENET_MEAN), channel_stats(IMAGENET_STD))
    assert torch.allclose(out, expected)
    assert not torch.allclose(out, to_model_input(batch), atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_compute_the_same_stain_ops(clinics: dict[str, np.ndarray],
                                                 styles: dict[str, StainStats]) -> None:
    x = torch.from_numpy(clinics["clinic-a"]).permute(0, 3, 1, 2).float() / 255
    ops = [ReinhardNormaliser()] + [
        Restainer(styles["clinic-a"], [styles["clinic-c"]], method, probability=1.0)
        for method in RESTAIN_METHODS]
    for op in ops:
        cpu = op(x, seeded(0))
        cuda = op.to("cuda")(x.to("cuda"), torch.Generator("cuda").manual_seed(0))
        assert cuda.device.type == "cuda"
        assert torch.allclose(cpu, cuda.cpu(), atol=1e-3), type(op).__name__
