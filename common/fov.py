"""Cell-centred field-of-view normalisation.

Centres image white cells at different magnifications: Barcelona shows a wide field with the
cell among many red cells, Jiangxi and BCCD show tight crops. ``find_cell`` locates the white
cell by its nucleus, the strongest absorber of green light under every Romanowsky-type stain
(MGG purple, rapid-stain maroon, BCCD blue), while red cells, cytoplasm and white, yellow or
bluish backgrounds absorb much less green. ``crop_to_cell`` then cuts a square window
proportional to the nucleus size, so every centre shows the network the same view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

ANALYSIS_SIZE = 128  # detection runs on a block-averaged copy whose short side is about this
SMOOTHING_SIGMA = 0.012  # Gaussian smoothing of the score, as a fraction of the short side
GROUPING_RADIUS = 0.03  # nuclear lobes closer than this (fraction of short side) form one nucleus
CENTRE_FALLOFF = 0.25  # weight exp(-(d / (CENTRE_FALLOFF * short side))^2), d: gap to centre
MIN_STRUCTURE = 0.3  # smoothed / raw score variance below this: pixel noise, no objects
MIN_CONTRAST_OD = 0.05  # optical-density gap between nucleus and rest below this: no nucleus
MIN_AREA_FRACTION = 0.005  # nucleus smaller than this fraction of the image: debris, not a cell
MAX_AREA_FRACTION = 0.75  # nucleus larger than this fraction: the threshold caught background
FALLBACK_FRACTION = 0.8  # centre-crop side (fraction of the short side) when no cell is found


@dataclass(frozen=True)
class CellBox:
    """Where the white cell is, in pixels of the input image.

    ``cy``/``cx`` is the nucleus centroid and ``size`` the side of its bounding square;
    ``found`` is False when detection failed and the box is the image centre (``size`` 0).
    """

    cy: float
    cx: float
    size: float
    found: bool


def block_mean(channel: np.ndarray, factor: int) -> np.ndarray:
    """Float32 (H // factor, W // factor) averages of ``factor`` x ``factor`` blocks."""
    rows, cols = channel.shape[0] // factor, channel.shape[1] // factor
    blocks = channel[: rows * factor, : cols * factor].astype(np.float32)
    return blocks.reshape(rows, factor, cols, factor).mean(axis=(1, 3))


def optical_density(intensity: np.ndarray) -> np.ndarray:
    """Optical density -log10(I / 255) of intensities in [0, 255] (offset by 1 to stay finite)."""
    return -np.log10((intensity + 1.0) / 256.0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu threshold of ``values``: maximises the between-class variance of the histogram."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    p = counts / counts.sum()
    weight_low = np.cumsum(p)
    mass_low = np.cumsum(p * centres)
    total_mean = mass_low[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight_low - mass_low) ** 2 / (weight_low * (1 - weight_low))
    between = np.nan_to_num(between[:-1])
    return float(edges[int(np.argmax(between)) + 1])


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element of the given radius."""
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return yy**2 + xx**2 <= radius**2


def select_central_component(mask: np.ndarray, group_radius: int) -> np.ndarray:
    """The connected part of ``mask`` (lobes within ``group_radius`` merged) that is largest
    after weighting by how close it comes to the image centre; all False if ``mask`` is empty."""
    groups, n = ndi.label(ndi.binary_dilation(mask, structure=disk(group_radius)))
    if n == 0:
        return np.zeros_like(mask)
    groups[~mask] = 0
    index = np.arange(1, n + 1)
    rows, cols = np.indices(mask.shape)
    centre_distance = np.hypot(rows - (mask.shape[0] - 1) / 2, cols - (mask.shape[1] - 1) / 2)
    areas = ndi.sum_labels(mask, groups, index)
    nearest = ndi.minimum(centre_distance, groups, index)
    weights = areas * np.exp(-((nearest / (CENTRE_FALLOFF * min(mask.shape))) ** 2))
    return groups == index[int(np.argmax(weights))]


def nucleus_mask(image: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of the white cell's nucleus in a uint8 (H, W, 3) image.

    Green optical density, smoothed, is thresholded with Otsu on a block-averaged copy; the
    central component is kept. All False when the image has no structure beyond pixel noise, no
    clear dark foreground, or the component is implausibly small or large.
    """
    height, width = image.shape[:2]
    factor = max(1, round(min(height, width) / ANALYSIS_SIZE))
    raw_score = optical_density(block_mean(image[..., 1], factor))
    short_side = min(raw_score.shape)
    score = ndi.gaussian_filter(raw_score, SMOOTHING_SIGMA * short_side)
    mask = np.zeros((height, width), dtype=bool)
    if raw_score.var() == 0 or score.var() < MIN_STRUCTURE * raw_score.var():
        return mask
    foreground = score > otsu_threshold(score)
    if not foreground.any() or foreground.all():
        return mask
    if score[foreground].mean() - score[~foreground].mean() < MIN_CONTRAST_OD:
        return mask
    nucleus = select_central_component(foreground, max(1, round(GROUPING_RADIUS * short_side)))
    if not MIN_AREA_FRACTION <= nucleus.mean() <= MAX_AREA_FRACTION:
        return mask
    upsampled = np.repeat(np.repeat(nucleus, factor, axis=0), factor, axis=1)
    mask[: upsampled.shape[0], : upsampled.shape[1]] = upsampled
    return mask


def find_cell(image: np.ndarray) -> CellBox:
    """Locate the white cell in a uint8 (H, W, 3) image by its nucleus (see ``nucleus_mask``)."""
    rows, cols = np.nonzero(nucleus_mask(image))
    if rows.size == 0:
        return CellBox(cy=image.shape[0] / 2, cx=image.shape[1] / 2, size=0.0, found=False)
    size = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    return CellBox(cy=rows.mean() + 0.5, cx=cols.mean() + 0.5, size=float(size), found=True)


def crop_window(box: CellBox, shape: tuple[int, ...],
                context: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the square crop window for ``box`` in an image of ``shape``.

    The side is ``context`` x the nucleus size (``FALLBACK_FRACTION`` of the short side when the
    cell was not found), at most the short side; the window is centred on the nucleus and
    shifted inside the image at the borders rather than padded.
    """
    height, width = shape[:2]
    short_side = min(height, width)
    side = context * box.size if box.found else FALLBACK_FRACTION * short_side
    side = min(side, short_side)
    top = float(np.clip(box.cy - side / 2, 0, height - side))
    left = float(np.clip(box.cx - side / 2, 0, width - side))
    return left, top, left + side, top + side


def crop_to_cell(image: np.ndarray, out_size: int, context: float = 2.2,
                 box: CellBox | None = None) -> np.ndarray:
    """Uint8 (out_size, out_size, 3) view of the white cell (``box`` found if not given)."""
    box = find_cell(image) if box is None else box
    window = crop_window(box, image.shape, context)
    resized = Image.fromarray(image).resize((out_size, out_size), Image.Resampling.BILINEAR,
                                            box=window)
    return np.asarray(resized)


def normalise_field_of_view(images: np.ndarray, out_size: int,
                            context: float = 2.2) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centred crops (N, out_size, out_size, 3) of a uint8 batch and a per-image ``found``."""
    crops = np.zeros((len(images), out_size, out_size, 3), dtype=np.uint8)
    found = np.zeros(len(images), dtype=bool)
    for i, image in enumerate(images):
        box = find_cell(image)
        crops[i] = crop_to_cell(image, out_size, context, box)
        found[i] = box.found
    return crops, found
