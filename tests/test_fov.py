"""Cell-centred field-of-view normalisation on synthetic images, on real images of 3 centres and
on wide fields made from them (``tests/widefield.py``)."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.fov import (
    FALLBACK_FRACTION,
    MAX_WINDOW_FRACTION,
    CellBox,
    border_colour,
    crop_to_cell,
    crop_window,
    find_cell,
    normalise_field_of_view,
)
from tests.widefield import (
    FIELD,
    Truth,
    corner_patch,
    jpeg,
    mirror_tiled,
    red_cell_field,
    wide_field,
)

SHARED_DATA = Path(os.environ.get("CYTOFED_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared/data/wbc"))
BASELINE_BOXES = Path(__file__).parent / "data" / "fov_baseline_boxes.json"
WBC_CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
PER_CLASS = 2
OUT_SIZE = 96
PALE_PINK = ((215, 180, 190), (238, 228, 225))  # (red cell, background) of a synthetic smear
PALE_BLUISH = ((196, 184, 214), (232, 228, 236))
PADDINGS = {"none": (), "left": (("left", 0.2),), "top+right": (("top", 0.15), ("right", 0.1))}
# The wide-field box must centre on the nucleus within CENTRE_TOLERANCE of its size and match
# its size within SIZE_TOLERANCE: the crop then shows the cell at 0.7 to 1.4 times the scale it
# has at the other centres, within the spread of nucleus sizes inside one centre (Barcelona's
# boxes span 0.27 to 0.46 of the short side, 5th to 95th percentile, a factor 1.7) and far from
# the 4 to 5 times of the whole-image boxes the defect gave. Measured: the worst case is a pale
# BCCD nucleus at 5% in bluish red cells, boxed at 0.74 of its size (its blurred rim is lost).
CENTRE_TOLERANCE = 0.2
SIZE_TOLERANCE = 1.4


def spread(files: list[Path], count: int) -> list[Path]:
    """``count`` files evenly spread over the sorted list (deterministic, varied)."""
    files = sorted(files)
    return [files[i * len(files) // count] for i in range(min(count, len(files)))]


def need_shared_data() -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared WBC data not found at {SHARED_DATA}")


def centre_files(centre: str) -> list[Path]:
    """About ten image paths of one centre; skips the test when the shared data is absent."""
    need_shared_data()
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


def assert_fits(box: CellBox, truth: Truth, what: str) -> None:
    """``box`` found, centred on the nucleus of ``truth`` and of its size (see tolerances)."""
    assert box.found, f"{what}: not found ({box.reason})"
    gap = np.hypot(box.cy - truth.cy, box.cx - truth.cx)
    assert gap <= CENTRE_TOLERANCE * truth.size, f"{what}: {gap:.1f} px off ({truth.size:.0f})"
    ratio = box.size / truth.size
    assert 1 / SIZE_TOLERANCE <= ratio <= SIZE_TOLERANCE, f"{what}: size x{ratio:.2f}"


def test_synthetic_nucleus_is_found_where_it_is() -> None:
    box = find_cell(synthetic_cell())
    assert box.found and box.reason == ""
    assert abs(box.cy - 80) < 2 and abs(box.cx - 150) < 2
    assert abs(box.size - 40) < 4


def test_pillow_images_give_the_same_box_as_arrays() -> None:
    image = synthetic_cell()
    assert find_cell(Image.fromarray(image)) == find_cell(image)
    np.testing.assert_array_equal(crop_to_cell(Image.fromarray(image), OUT_SIZE),
                                  crop_to_cell(image, OUT_SIZE))


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
    assert right - left == pytest.approx(MAX_WINDOW_FRACTION * min(image.shape[:2]))


def test_a_tight_crop_shows_the_cell_at_the_scale_of_a_wide_field() -> None:
    # The same cell in a wide field and cut tightly around it (as Jiangxi and BCCD send it):
    # the window is context x the nucleus in both, so the cell fills the same share of the
    # crop; where the window leaves the tight image, the border's colour fills it.
    wide = synthetic_cell(shape=(240, 240), centre=(120, 120), radius=20)
    tight = wide[85:155, 85:155]
    wide_crop, tight_crop = crop_to_cell(wide, OUT_SIZE), crop_to_cell(tight, OUT_SIZE)
    dark = [(crop.min(axis=2) < 120).mean() for crop in (wide_crop, tight_crop)]
    assert dark[1] == pytest.approx(dark[0], rel=0.25)
    corner = tight_crop[:4, :4].reshape(-1, 3).astype(int)
    assert np.abs(corner - np.asarray(border_colour(Image.fromarray(tight)))).max() <= 2


def test_crop_to_cell_shape_and_zoom() -> None:
    image = synthetic_cell()
    crop = crop_to_cell(image, OUT_SIZE)
    assert crop.shape == (OUT_SIZE, OUT_SIZE, 3) and crop.dtype == np.uint8
    nucleus_fraction = (crop[..., 1] < 100).mean()
    assert nucleus_fraction > 3 * (image[..., 1] < 100).mean()
    assert crop[OUT_SIZE // 2, OUT_SIZE // 2, 1] < 100


def no_cell_image(name: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if name in ("pink_red_cells", "bluish_red_cells", "padded_red_cells"):
        field = red_cell_field(FIELD, 40, rng, *(PALE_PINK if name == "pink_red_cells"
                                                 else PALE_BLUISH))
        if name == "padded_red_cells":
            field[:50] = 0
            field[:, -30:] = 0
        return jpeg(field)
    return {
        "white": np.full((150, 180, 3), 255, np.uint8),
        "black": np.zeros((150, 180, 3), np.uint8),
        "grey": np.full((150, 180, 3), 128, np.uint8),
        "noise": rng.integers(0, 256, (150, 180, 3), dtype=np.uint8),
        "grey_noise": np.clip(rng.normal(128, 30, (150, 180, 3)), 0, 255).astype(np.uint8),
    }[name]


@pytest.mark.parametrize("name", ["white", "black", "grey", "noise", "grey_noise",
                                  "pink_red_cells", "bluish_red_cells", "padded_red_cells"])
def test_no_cell_is_not_found_and_falls_back_to_a_centre_crop(name: str) -> None:
    image = no_cell_image(name)
    box = find_cell(image)
    assert not box.found and box.reason
    height, width = image.shape[:2]
    left, top, right, bottom = crop_window(box, image.shape, 2.2)
    assert (left + right) / 2 == pytest.approx(width / 2)
    assert (top + bottom) / 2 == pytest.approx(height / 2)
    assert right - left == pytest.approx(FALLBACK_FRACTION * min(height, width))
    crop = crop_to_cell(image, OUT_SIZE)
    assert crop.shape == (OUT_SIZE, OUT_SIZE, 3) and crop.dtype == np.uint8


@pytest.mark.parametrize("area", [0.05, 0.2, 0.6])
@pytest.mark.parametrize("background", ["pink", "bluish"])
@pytest.mark.parametrize("padding", list(PADDINGS))
def test_synthetic_nucleus_in_a_wide_field(area: float, background: str, padding: str) -> None:
    """A purple nucleus covering ``area`` (as a cell) of a field of pale red cells, with black
    padding: the box fits the nucleus (the finder before this fix boxed the whole field)."""
    cell = synthetic_cell(shape=(120, 120), centre=(60, 60), radius=20)
    rng = np.random.default_rng(round(100 * area))
    field, truth = wide_field(cell, Truth(60.0, 60.0, 40.0), area,
                              PALE_PINK if background == "pink" else PALE_BLUISH, rng,
                              PADDINGS[padding])
    assert_fits(find_cell(field), truth, f"{background} {padding} {area}")


def test_normalise_field_of_view_of_empty_batch() -> None:
    crops, found = normalise_field_of_view(np.zeros((0, 50, 50, 3), np.uint8), OUT_SIZE)
    assert crops.shape == (0, OUT_SIZE, OUT_SIZE, 3) and found.shape == (0,)


@pytest.mark.parametrize("centre", ["barcelona", "jiangxi", "bccd"])
def test_real_cells_are_found_and_cropped_around_their_nucleus(centre: str) -> None:
    for path in centre_files(centre):
        image = load(path)
        box = find_cell(image)
        assert box.found, f"{path.name}: {box.reason}"
        window = crop_window(box, image.shape, 2.2)
        half = box.size / 2
        corners = np.array([[box.cy - half, box.cx - half], [box.cy + half, box.cx + half]])
        corners = np.clip(corners, 0, image.shape[:2])
        assert inside(corners[:, 0], corners[:, 1], window).all(), path.name


def test_barcelona_view_is_tightened_on_the_cell() -> None:
    sides, dark_gain = [], []
    for path in centre_files("barcelona"):
        image = load(path)
        box = find_cell(image)
        sides.append(relative_window_side(image, box))
        crop = crop_to_cell(image, OUT_SIZE, box=box)
        dark_gain.append((crop[..., 1] < 110).mean() / max((image[..., 1] < 110).mean(), 1e-6))
    assert np.median(sides) < 0.85 and max(sides) <= MAX_WINDOW_FRACTION
    assert np.median(dark_gain) > 1.3  # more of the view is nucleus (MGG nuclei: green < 110)


@pytest.mark.parametrize("centre", ["jiangxi", "bccd"])
def test_tight_crops_keep_nearly_the_whole_view(centre: str) -> None:
    sides = [relative_window_side(image, find_cell(image))
             for image in map(load, centre_files(centre))]
    assert np.median(sides) >= 0.9


def expert_nucleus(path: Path) -> Truth:
    """Jiangxi's expert nucleus (255 in the ``.png`` mask beside the image) as a box."""
    rows, cols = np.nonzero(np.asarray(Image.open(path.with_suffix(".png"))) == 255)
    return Truth(rows.mean() + 0.5, cols.mean() + 0.5,
                 float(max(np.ptp(rows), np.ptp(cols)) + 1))


def test_jiangxi_expert_nucleus_lies_in_the_crop_window() -> None:
    for path in centre_files("jiangxi"):
        image = load(path)
        expert = expert_nucleus(path)
        box = find_cell(image)
        assert inside(expert.cy, expert.cx, crop_window(box, image.shape, 2.2)), path.name
        distance = np.hypot(box.cy - expert.cy, box.cx - expert.cx)
        assert distance < 0.15 * min(image.shape[:2]), path.name


def test_normalise_field_of_view_on_a_real_batch() -> None:
    images = np.stack([load(path)[:360, :360] for path in centre_files("barcelona")])
    crops, found = normalise_field_of_view(images, OUT_SIZE)
    assert crops.shape == (len(images), OUT_SIZE, OUT_SIZE, 3) and crops.dtype == np.uint8
    assert found.dtype == bool and found.all()
    assert np.array_equal(crops[0], crop_to_cell(images[0], OUT_SIZE))


@cache
def baseline_boxes() -> dict[str, dict[str, Truth]]:
    """Per centre, the boxes of the finder before the wide-field fix on the 40 images of
    ``tests/data/fov_baseline_boxes.json`` where it was right: found, a box under 0.85 of the
    short side, centred within a quarter of the short side of these cell-centred images."""
    need_shared_data()
    right: dict[str, dict[str, Truth]] = {}
    for centre, boxes in json.loads(BASELINE_BOXES.read_text())["centres"].items():
        right[centre] = {}
        for name, (cy, cx, size, found) in boxes.items():
            with Image.open(SHARED_DATA / name) as image:
                width, height = image.size
            short_side = min(height, width)
            if found and size < 0.85 * short_side and \
                    np.hypot(cy - height / 2, cx - width / 2) < 0.25 * short_side:
                right[centre][name] = Truth(cy, cx, size)
    return right


@pytest.mark.parametrize("centre", ["barcelona", "jiangxi", "bccd"])
def test_boxes_agree_with_the_baseline_where_it_was_right(centre: str) -> None:
    """Measured on these images, with windows no longer capped at the image (so a nucleus box
    a few percent smaller now shows in a tight crop's window): crop windows within 1 pixel of
    a 64 px crop of the baseline's for 97.5% at Barcelona, 87.9% at BCCD and 82.5% at Jiangxi
    (boxes 4-8% smaller on pale maroon nuclei, where the baseline boxed the whole cell)."""
    gaps = []
    for name, old in baseline_boxes()[centre].items():
        image = load(SHARED_DATA / name)
        box = find_cell(image)
        assert box.found, f"{name}: {box.reason}"
        old_window = crop_window(CellBox(old.cy, old.cx, old.size, True), image.shape, 2.2)
        new_window = crop_window(box, image.shape, 2.2)
        scale = 64 / (old_window[2] - old_window[0])
        gaps.append(scale * max(abs(a - b) for a, b in zip(old_window, new_window, strict=True)))
    within = np.mean(np.asarray(gaps) <= 1)
    print(f"{centre}: {len(gaps)} images, crop windows within 1 px at 64 px: {within:.1%}")
    assert len(gaps) >= 30 and within >= 0.8


def real_cells(centre: str, count: int = 2) -> list[tuple[np.ndarray, Truth]]:
    """``count`` cells of a shared centre with their nucleus box: Jiangxi's expert box, else
    the baseline's where it was right."""
    boxes = baseline_boxes()[centre]
    names = [name for i, name in enumerate(sorted(boxes)) if i % (len(boxes) // count) == 0]
    return [(load(SHARED_DATA / name),
             expert_nucleus(SHARED_DATA / name) if centre == "jiangxi" else boxes[name])
            for name in names[:count]]


@cache
def barcelona_red_cells() -> np.ndarray:
    """A corner of a Barcelona image holding red cells only (no stained blob)."""
    for name in sorted(baseline_boxes()["barcelona"]):
        patch = corner_patch(load(SHARED_DATA / name))
        if not find_cell(mirror_tiled(patch, FIELD)).found:
            return patch
    raise AssertionError("no Barcelona corner without a stained blob")


@pytest.mark.parametrize("centre", ["barcelona", "jiangxi", "bccd"])
def test_wide_fields_made_of_shared_cells(centre: str) -> None:
    """Real cells downscaled into fields of red cells (a Barcelona corner mirror-tiled, pale
    pink or bluish synthetic ones), covering 5%, 20% or 60% of the image, with and without
    black padding: the box centres on the nucleus and matches its size."""
    backgrounds = {"barcelona": barcelona_red_cells(), "pink": PALE_PINK, "bluish": PALE_BLUISH}
    rng = np.random.default_rng(7)
    for i, (image, nucleus) in enumerate(real_cells(centre)):
        for area in (0.05, 0.2, 0.6):
            for background_name, background in backgrounds.items():
                for padding_name, padding in PADDINGS.items():
                    field, truth = wide_field(image, nucleus, area, background, rng, padding)
                    assert_fits(find_cell(field), truth,
                                f"{centre} cell {i}, {area:.0%}, {background_name}, "
                                f"padding {padding_name}")


@pytest.mark.parametrize("padding", list(PADDINGS))
def test_barcelona_red_cells_alone_are_no_cell(padding: str) -> None:
    field = mirror_tiled(barcelona_red_cells(), FIELD)
    for side, fraction in PADDINGS[padding]:
        band = int(fraction * FIELD)
        field[{"top": np.s_[:band], "right": np.s_[:, FIELD - band:],
               "left": np.s_[:, :band]}[side]] = 0
    box = find_cell(jpeg(field))
    assert not box.found and box.reason
