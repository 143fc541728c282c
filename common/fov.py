"""Cell-centred field-of-view normalisation.

Centres image white cells at different magnifications: Barcelona shows a wide field with the
cell among many red cells, Jiangxi and BCCD show tight crops, and clinics send fields where
the cell covers a twentieth of the image among pale, bluish red cells, some with black padding
where the crop was cut at the edge of a larger photo. ``find_cell`` locates the white cell by
its nucleus, which under every Romanowsky-type stain (MGG purple, rapid-stain maroon, BCCD
blue) is both dark in green light and bluer than it is green, while red cells, cytoplasm
granules, backgrounds and padding are either pale in green or neutral-to-red in hue.
``crop_to_cell`` then cuts a square window proportional to the nucleus size, so every centre
shows the network the same view.

When no nucleus is found with enough evidence, ``find_cell`` says so (``found=False`` and a
``reason``) and the view falls back to a centre crop; it never reports the whole field as a
cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage as ndi

ANALYSIS_SIZE = 128  # detection runs on a block-averaged copy whose short side is about this
SMOOTHING_SIGMA = 0.012  # Gaussian smoothing of the scores, as a fraction of the short side
GROUPING_RADIUS = 0.022  # nuclear lobes less than this apart in rows and in columns (fraction
#                         of the short side) form one nucleus
CENTRE_FALLOFF = 0.25  # weight exp(-(d / (CENTRE_FALLOFF * short side))^2), d: gap to centre
MIN_STRUCTURE = 0.3  # smoothed / raw darkness variance below this: pixel noise, no objects
PADDING_LEVEL = 40  # pixels whose brightest channel is below this are padding, never a cell
MIN_FIELD_FRACTION = 0.1  # less of the image than this outside the padding: nothing to search
STAIN_CHROMA = 0.06  # green minus blue optical density above this: nuclear stain (see HUE_NOTE)
TINTED_HUE = 0.13  # dark stained pixels with a median hue below this may be mostly tinted red
HUE_RATIO = 0.5  # cells: if Otsu splits them by stain (darkness x hue) into a class less than
#                  HUE_RATIO as hued as the other, the nucleus is the more stained class
MIN_EVIDENCE = 0.15  # nucleus hue plus darkness over its surroundings below this: not a nucleus
MIN_AREA_FRACTION = 0.005  # nucleus smaller than this fraction of the field: debris, not a cell
MAX_AREA_FRACTION = 0.75  # nucleus larger than this fraction: the threshold caught background
MAX_WINDOW_FRACTION = 2.0  # widest crop window, as a multiple of the image's short side
FALLBACK_FRACTION = 0.8  # centre-crop side (fraction of the short side) when no cell is found

# HUE_NOTE: on the three shared centres, nuclei have a median green-minus-blue optical density
# (hue) of 0.28 to 0.58, while red cells, backgrounds and neutral padding stay below 0.06 in 90%
# of their pixels. Pale bluish red cells reach about 0.08 and purple-tinted ones (the synthetic
# clinic-c) 0.12: the TINTED_HUE step keeps them out of the nucleus, and MIN_EVIDENCE refuses a
# field of them alone, since none is darker than the others.

OPTICAL_DENSITY = (-np.log10((np.arange(256) + 1.0) / 256.0)).astype(np.float32)  # per level


@dataclass(frozen=True)
class CellBox:
    """Where the white cell is, in pixels of the input image.

    ``cy``/``cx`` is the nucleus centroid and ``size`` the side of its bounding square;
    ``found`` is False when detection failed and the box is the image centre (``size`` 0);
    ``reason`` then says why: ``padding`` (almost all black), ``blank`` (no structure beyond
    pixel noise), ``no stain`` (nothing of nuclear hue and darkness), ``too small`` or ``too
    large`` (for a nucleus), ``faint`` (not more hued and darker than its surroundings).
    """

    cy: float
    cx: float
    size: float
    found: bool
    reason: str = ""


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu threshold of ``values``: maximises the between-class variance of the histogram."""
    low, high = float(values.min()), float(values.max())
    if high == low:
        return low
    width = (high - low) / bins
    bins_of = np.minimum(((values.ravel() - low) / width).astype(np.intp), bins - 1)
    counts = np.bincount(bins_of, minlength=bins)
    edges = low + width * np.arange(bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    p = counts / counts.sum()
    weight_low = np.cumsum(p)
    mass_low = np.cumsum(p * centres)
    total_mean = mass_low[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight_low - mass_low) ** 2 / (weight_low * (1 - weight_low))
    between = np.nan_to_num(between[:-1])
    return float(edges[int(np.argmax(between)) + 1])


def as_picture(image: np.ndarray | Image.Image) -> Image.Image:
    """``image`` as a Pillow image (uint8 (H, W, 3) arrays are wrapped, images kept)."""
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


def analysis_image(image: Image.Image) -> tuple[np.ndarray, int]:
    """Uint8 copy of an RGB ``image`` averaged over ``factor`` x ``factor`` blocks (remainder
    rows and columns dropped) so that its short side is about ``ANALYSIS_SIZE``, and ``factor``.
    """
    width, height = image.size
    factor = max(1, round(min(height, width) / ANALYSIS_SIZE))
    if factor == 1:
        return np.asarray(image), 1
    whole = (0, 0, width // factor * factor, height // factor * factor)
    return np.asarray(image.reduce(factor, box=whole)), factor


def field_mask(image: np.ndarray) -> np.ndarray:
    """Pixels of the field: not black padding (nor its one-pixel blurred rim)."""
    brightest = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])
    field = brightest >= PADDING_LEVEL
    return field if field.all() else ndi.minimum_filter(field, size=3, mode="nearest")


def stain_scores(green: np.ndarray, blue: np.ndarray,
                 sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Darkness and hue, smoothed: the optical density ``green`` and the difference
    ``green - blue`` of the green and blue densities."""
    return (ndi.gaussian_filter(green, sigma, truncate=3.0),
            ndi.gaussian_filter(green - blue, sigma, truncate=3.0))


def central_group(candidates: np.ndarray, weights: np.ndarray,
                  radius: int) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``candidates`` (parts within ``radius`` merged) with the largest summed
    ``weights``, discounted by how far it stays from the image centre, and that part grown by
    ``radius`` (its neighbourhood)."""
    grown, _ = ndi.label(ndi.maximum_filter(candidates, size=2 * radius + 1))
    labels = grown[candidates]
    rows, cols = np.nonzero(candidates)
    centre_distance = np.hypot(rows - (candidates.shape[0] - 1) / 2,
                               cols - (candidates.shape[1] - 1) / 2)
    mass = np.bincount(labels, weights=weights[candidates])
    nearest = np.full(len(mass), np.inf)
    np.minimum.at(nearest, labels, centre_distance)
    score = mass * np.exp(-((nearest / (CENTRE_FALLOFF * min(candidates.shape))) ** 2))
    neighbourhood = grown == np.argmax(score)
    return candidates & neighbourhood, neighbourhood


def nucleus_evidence(nucleus: np.ndarray, neighbourhood: np.ndarray, darkness: np.ndarray,
                     hue: np.ndarray, field: np.ndarray) -> float:
    """Mean hue of ``nucleus`` plus how much darker it is than the 90th percentile of the field
    outside its ``neighbourhood``: high for a nucleus, low for one red cell among alike ones."""
    rest = darkness[field & ~neighbourhood]
    if not rest.size:
        return float(hue[nucleus].mean() + 1.0)
    rank = int(0.9 * (rest.size - 1))
    contrast = darkness[nucleus].mean() - np.partition(rest, rank)[rank]
    return float(hue[nucleus].mean() + contrast)


def locate_nucleus(image: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Boolean mask of the nucleus nearest the centre of a uint8 (H, W, 3) image, or None and
    why not (a ``CellBox.reason``).

    Pixels darker than Otsu's threshold (over the field, padding excluded) and of nuclear hue
    are candidates (without tinted red cells, see ``TINTED_HUE``); the group of candidates with
    the most stain near the centre is the nucleus, if its size and evidence are plausible.
    """
    field = field_mask(image)
    if field.mean() < MIN_FIELD_FRACTION:
        return None, "padding"
    short_side = min(image.shape[:2])
    green, blue = OPTICAL_DENSITY[image[..., 1]], OPTICAL_DENSITY[image[..., 2]]
    darkness, hue = stain_scores(green, blue, SMOOTHING_SIGMA * short_side)
    whole = field.all()  # no padding: skip copying the field's pixels out
    raw, smooth = (green, darkness) if whole else (green[field], darkness[field])
    if raw.var() == 0 or smooth.var() < MIN_STRUCTURE * raw.var():
        return None, "blank"
    candidates = field & (hue > STAIN_CHROMA) & (darkness > otsu_threshold(smooth))
    if candidates.any() and np.median(hue[candidates]) < TINTED_HUE:
        stain = darkness * hue
        stained = candidates & (stain > otsu_threshold(stain[candidates]))
        rest = hue[candidates & ~stained]
        if rest.size and np.median(rest) < HUE_RATIO * np.median(hue[stained]):
            candidates = stained
    if not candidates.any():
        return None, "no stain"
    nucleus, neighbourhood = central_group(candidates, hue - STAIN_CHROMA,
                                           max(1, round(GROUPING_RADIUS * short_side)))
    area = nucleus.sum() / smooth.size
    if area < MIN_AREA_FRACTION:
        return None, "too small"
    if area > MAX_AREA_FRACTION:
        return None, "too large"
    if nucleus_evidence(nucleus, neighbourhood, darkness, hue, field) < MIN_EVIDENCE:
        return None, "faint"
    return nucleus, ""


def find_cell(image: np.ndarray | Image.Image) -> CellBox:
    """Locate the white cell in a uint8 (H, W, 3) or RGB image by its nucleus
    (``locate_nucleus`` on the block-averaged ``analysis_image``)."""
    picture = as_picture(image)
    small, factor = analysis_image(picture)
    nucleus, reason = locate_nucleus(small)
    if nucleus is None:
        return CellBox(cy=picture.height / 2, cx=picture.width / 2, size=0.0, found=False,
                       reason=reason)
    rows, cols = np.nonzero(nucleus)
    size = (max(rows.max() - rows.min(), cols.max() - cols.min()) + 1) * factor
    return CellBox(cy=float((rows.mean() + 0.5) * factor), cx=float((cols.mean() + 0.5) * factor),
                   size=float(size), found=True)


def crop_window(box: CellBox, shape: tuple[int, ...],
                context: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the square crop window for ``box`` in an image of ``shape``.

    The side is ``context`` x the nucleus size (``FALLBACK_FRACTION`` of the short side when the
    cell was not found), so the cell fills the same share of every crop whatever the centre's
    field of view; at most ``MAX_WINDOW_FRACTION`` x the short side. A window that fits is
    centred on the nucleus and shifted inside the image at its borders; a wider one (a tight
    crop around the cell, as Jiangxi and BCCD send) is centred on the nucleus and reaches past
    the image, where :func:`crop_to_cell` pads with the border's colour.
    """
    height, width = shape[:2]
    short_side = min(height, width)
    side = context * box.size if box.found else FALLBACK_FRACTION * short_side
    side = min(side, MAX_WINDOW_FRACTION * short_side)
    top = float(np.clip(box.cy - side / 2, 0, height - side)) if side <= height else \
        float(box.cy - side / 2)
    left = float(np.clip(box.cx - side / 2, 0, width - side)) if side <= width else \
        float(box.cx - side / 2)
    return left, top, left + side, top + side


def border_colour(picture: Image.Image) -> tuple[int, int, int]:
    """Per-channel median of the outermost pixel ring of an RGB image (its background)."""
    pixels = np.asarray(picture)
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    red, green, blue = np.median(ring, axis=0)
    return int(red), int(green), int(blue)


def crop_to_cell(image: np.ndarray | Image.Image, out_size: int, context: float = 2.2,
                 box: CellBox | None = None) -> np.ndarray:
    """Uint8 (out_size, out_size, 3) view of the white cell (``box`` found if not given);
    where the window reaches past the image, the border's colour fills it."""
    picture = as_picture(image)
    box = find_cell(picture) if box is None else box
    left, top, right, bottom = crop_window(box, (picture.height, picture.width), context)
    margin = math.ceil(max(0.0, -left, -top, right - picture.width, bottom - picture.height))
    if margin:
        picture = ImageOps.expand(picture, border=margin, fill=border_colour(picture))
        left, top, right, bottom = (v + margin for v in (left, top, right, bottom))
    return np.asarray(picture.resize((out_size, out_size), Image.Resampling.BILINEAR,
                                     box=(left, top, right, bottom)))


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
