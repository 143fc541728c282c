"""Cell-centred field-of-view normalisation on synthetic images and on real images of 3 centres."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.fov import (
    FALLBACK_FRACTION,
    CellBox,
    crop_to_cell,
    crop_window,
    find_cell,
    normalise_field_of_view,
    nucleus_mask,
)

SHARED_DATA = Path(os.environ.get("CYTOFED_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared/data/wbc"))
WBC_CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
PER_CLASS = 2
OUT_SIZE = 96


def spread(files: list[Path], count: int) -> list[Path]:
    """``count`` files evenly spread over the sorted list (deterministic, varied)."""
    files = sorted(files)
    return [files[i * len(files) // count] for i in range(min(count, len(files)))]


def centre_files(centre: str) -> list[Path]:
    """About ten image paths of one centre; skips the test when the shared data is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared WBC data not found at {SHARED_DATA}")
    if centre == "barcelona":
        root = SHARED_DATA / "PBC_dataset_normal_DIB"
        return [f for c in WBC_CLASSES for f in spread(list((root / c).glob("[!.]*.jpg")),
                                                        PER_CLASS)]
    if centre == "jiangxi":
        return spread(list((SHARED_DATA / "segmentation_WBC/Dataset 1").glob("*.bmp")), 10)
    root = SHARED_DATA / "BCCD/BCCD_cropped"
    return [f for c in WBC_CLASSES for f in spread(list((root / c.capitalize()).glob("*.jpg")),
                                                    PER_CLASS)]


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def inside(row: np.ndarray | float, col: np.ndarray | float,
           window: tuple[float, ...]) -> np.ndarray:
    """Whether (row, col) lies in the (left, top, right, bottom) window (element-wise)."""
    left, top, right, bottom = window
    return (left <= col) & (col <= right) & (top <= row) & (row <= bottom)


def relative_window_side(image: np.ndarray, box: CellBox) -> float:
    left, _, right, _ = crop_window(box, image.shape, 2.2)
    return (right - left) / min(image.shape[:2])


def synthetic_cell(shape: tuple[int, int] = (200, 240), centre: tuple[int, int] = (80, 150),
                   radius: int = 20) -> np.ndarray:
    """Pale pink background with a few light red cells and one dark purple nucleus."""
    image = np.empty((*shape, 3), dtype=np.uint8)
    image[:] = (235, 215, 205)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    for cy, cx in ((30, 30), (170, 60), (150, 200)):
        image[(rows - cy) ** 2 + (cols - cx) ** 2 < 15**2] = (205, 165, 165)
    image[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2] = (90, 50, 130)
    return image


def test_synthetic_nucleus_is_found_where_it_is() -> None:
    box = find_cell(synthetic_cell())
    assert box.found
    assert abs(box.cy - 80) < 2 and abs(box.cx - 150) < 2
    assert abs(box.size - 40) < 4


def test_crop_window_is_square_inside_image_and_scaled_by_context() -> None:
    image = synthetic_cell()
    box = find_cell(image)
    left, top, right, bottom = crop_window(box, image.shape, 2.0)
    assert right - left == pytest.approx(bottom - top)
    assert right - left == pytest.approx(2.0 * box.size)
    assert left >= 0 and top >= 0 and right <= image.shape[1] and bottom <= image.shape[0]
    corner = CellBox(cy=5.0, cx=5.0, size=50.0, found=True)
    assert crop_window(corner, image.shape, 2.2)[:2] == (0.0, 0.0)
    huge = CellBox(cy=100.0, cx=120.0, size=500.0, found=True)
    left, _, right, _ = crop_window(huge, image.shape, 2.2)
    assert right - left == pytest.approx(min(image.shape[:2]))


def test_crop_to_cell_shape_and_zoom() -> None:
    image = synthetic_cell()
    crop = crop_to_cell(image, OUT_SIZE)
    assert crop.shape == (OUT_SIZE, OUT_SIZE, 3) and crop.dtype == np.uint8
    nucleus_fraction = (crop[..., 1] < 100).mean()
    assert nucleus_fraction > 3 * (image[..., 1] < 100).mean()
    assert crop[OUT_SIZE // 2, OUT_SIZE // 2, 1] < 100


@pytest.mark.parametrize("name", ["white", "black", "grey", "noise", "grey_noise"])
def test_no_cell_falls_back_to_centre_crop(name: str) -> None:
    rng = np.random.default_rng(0)
    image = {
        "white": np.full((150, 180, 3), 255, np.uint8),
        "black": np.zeros((150, 180, 3), np.uint8),
        "grey": np.full((150, 180, 3), 128, np.uint8),
        "noise": rng.integers(0, 256, (150, 180, 3), dtype=np.uint8),
        "grey_noise": np.clip(rng.normal(128, 30, (150, 180, 3)), 0, 255).astype(np.uint8),
    }[name]
    box = find_cell(image)
    assert not box.found
    assert not nucleus_mask(image).any()
    left, top, right, bottom = crop_window(box, image.shape, 2.2)
    assert (left + right) / 2 == pytest.approx(90) and (top + bottom) / 2 == pytest.approx(75)
    assert right - left == pytest.approx(FALLBACK_FRACTION * 150)
    crop = crop_to_cell(image, OUT_SIZE)
    assert crop.shape == (OUT_SIZE, OUT_SIZE, 3) and crop.dtype == np.uint8


def test_normalise_field_of_view_of_empty_batch() -> None:
    crops, found = normalise_field_of_view(np.zeros((0, 50, 50, 3), np.uint8), OUT_SIZE)
    assert crops.shape == (0, OUT_SIZE, OUT_SIZE, 3) and found.shape == (0,)


@pytest.mark.parametrize("centre", ["barcelona", "jiangxi", "bccd"])
def test_real_cells_are_found_and_cropped_around_their_nucleus(centre: str) -> None:
    for path in centre_files(centre):
        image = load(path)
        box = find_cell(image)
        assert box.found, path.name
        window = crop_window(box, image.shape, 2.2)
        rows, cols = np.nonzero(nucleus_mask(image))
        assert inside(rows.mean() + 0.5, cols.mean() + 0.5, window), path.name
        assert inside(rows + 0.5, cols + 0.5, window).mean() >= 0.95, path.name


def test_barcelona_view_is_tightened_on_the_cell() -> None:
    sides, dark_gain = [], []
    for path in centre_files("barcelona"):
        image = load(path)
        box = find_cell(image)
        sides.append(relative_window_side(image, box))
        crop = crop_to_cell(image, OUT_SIZE, box=box)
        dark_gain.append((crop[..., 1] < 110).mean() / max((image[..., 1] < 110).mean(), 1e-6))
    assert np.median(sides) < 0.85 and max(sides) <= 1.0
    assert np.median(dark_gain) > 1.3  # more of the view is nucleus (MGG nuclei: green < 110)


@pytest.mark.parametrize("centre", ["jiangxi", "bccd"])
def test_tight_crops_keep_nearly_the_whole_view(centre: str) -> None:
    sides = [relative_window_side(image, find_cell(image))
             for image in map(load, centre_files(centre))]
    assert np.median(sides) >= 0.9


def test_jiangxi_expert_nucleus_lies_in_the_crop_window() -> None:
    for path in centre_files("jiangxi"):
        image = load(path)
        expert = np.asarray(Image.open(path.with_suffix(".png")))  # 255 nucleus, 128 cytoplasm
        expert_centroid = np.argwhere(expert == 255).mean(axis=0) + 0.5
        box = find_cell(image)
        assert inside(*expert_centroid, crop_window(box, image.shape, 2.2)), path.name
        distance = np.hypot(box.cy - expert_centroid[0], box.cx - expert_centroid[1])
        assert distance < 0.15 * min(image.shape[:2]), path.name


def test_normalise_field_of_view_on_a_real_batch() -> None:
    images = np.stack([load(path)[:360, :360] for path in centre_files("barcelona")])
    crops, found = normalise_field_of_view(images, OUT_SIZE)
    assert crops.shape == (len(images), OUT_SIZE, OUT_SIZE, 3) and crops.dtype == np.uint8
    assert found.dtype == bool and found.all()
    assert np.array_equal(crops[0], crop_to_cell(images[0], OUT_SIZE))
