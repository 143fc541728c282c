"""Wide fields for the cell finder's tests, made from real cells.

A cell (a disc around its nucleus, cut from a shared-centre image) is downscaled into a larger
field of red cells so that it covers a chosen share of the image, the way a clinic's camera
frames a white cell among many red ones; the field is either mirror-tiled from a corner of a
Barcelona image (red cells only, away from its white cell) or drawn synthetically (pale pink
or bluish red cells), optionally with black padding where a crop was cut at the edge of a
larger photo, and JPEG-encoded like a clinic's file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

FIELD = 224  # side of the made fields, like the clinic of the defect report
CELL_PER_NUCLEUS = 1.5  # white-cell diameter over nucleus box side, roughly, for framing
RED_PER_WHITE = 0.65  # red-cell diameter over white-cell diameter
BARCELONA_RED_CELL = 75.0  # red-cell diameter in Barcelona pixels


@dataclass(frozen=True)
class Truth:
    """Where the pasted nucleus is in the made field, in its pixels."""

    cy: float
    cx: float
    size: float


def jpeg(image: np.ndarray, quality: int = 90) -> np.ndarray:
    """``image`` after a JPEG round trip."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def resized(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` scaled by ``scale`` with Lanczos antialiasing."""
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def corner_patch(image: np.ndarray, fraction: float = 0.3) -> np.ndarray:
    """The top-left corner of a cell-centred image: red cells, away from its white cell."""
    side = int(fraction * min(image.shape[:2]))
    return image[:side, :side]


def mirror_tiled(patch: np.ndarray, side: int) -> np.ndarray:
    """A ``side`` x ``side`` field tiled with ``patch`` and its mirror images (no seams)."""
    block = np.concatenate([np.concatenate([patch, patch[:, ::-1]], axis=1),
                            np.concatenate([patch[::-1], patch[::-1, ::-1]], axis=1)], axis=0)
    reps = (side // block.shape[0] + 1, side // block.shape[1] + 1, 1)
    return np.tile(block, reps)[:side, :side]


def red_cell_field(side: int, diameter: float, rng: np.random.Generator,
                   red_cell: tuple[int, int, int], background: tuple[int, int, int],
                   coverage: float = 0.55) -> np.ndarray:
    """Synthetic smear: red cells with a pale centre on a background, lightly blurred, noisy."""
    field = np.empty((side, side, 3), np.float32)
    field[:] = background
    rows, cols = np.mgrid[:side, :side]
    radius = diameter / 2
    for _ in range(int(coverage * side * side / (np.pi * radius**2))):
        cy, cx = rng.uniform(-radius, side + radius, 2)
        distance = np.hypot(rows - cy, cols - cx) / (radius * rng.uniform(0.85, 1.15))
        field[distance < 1] = np.asarray(red_cell) + rng.normal(0, 4, 3)
        pallor = distance < 0.45
        field[pallor] = (field[pallor] + np.asarray(background)) / 2
    blurred = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(1))
    field = np.asarray(blurred, np.float32)
    return np.clip(field + rng.normal(0, 3, field.shape), 0, 255).astype(np.uint8)


def paste_disc(field: np.ndarray, cell: np.ndarray, at: tuple[float, float],
               centre: tuple[float, float], radius: float) -> np.ndarray:
    """``field`` with the disc of ``cell`` of ``radius`` around ``centre`` (cell pixels)
    blended in, its centre at ``at`` (field pixels), edges feathered."""
    out = field.astype(np.float32)
    rows, cols = np.mgrid[: cell.shape[0], : cell.shape[1]]
    distance = np.hypot(rows + 0.5 - centre[0], cols + 0.5 - centre[1])
    alpha = np.clip((radius - distance) / max(2.0, 0.08 * radius), 0, 1)[..., None]
    top, left = round(at[0] - centre[0]), round(at[1] - centre[1])
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + cell.shape[0], field.shape[0]), min(left + cell.shape[1], field.shape[1])
    source = np.s_[y0 - top:y1 - top, x0 - left:x1 - left]
    out[y0:y1, x0:x1] = alpha[source] * cell[source] + (1 - alpha[source]) * out[y0:y1, x0:x1]
    return out.astype(np.uint8)


def wide_field(cell_image: np.ndarray, nucleus: Truth, area_fraction: float,
               background: np.ndarray | tuple[tuple[int, int, int], tuple[int, int, int]],
               rng: np.random.Generator, padding: tuple[tuple[str, float], ...] = (),
               red_cell_diameter: float = BARCELONA_RED_CELL) -> tuple[np.ndarray, Truth]:
    """A ``FIELD`` px field in which the white cell of ``cell_image`` (nucleus box
    ``nucleus``) covers about ``area_fraction`` of the image near its centre, and where its
    nucleus is.

    ``background``: a red-cell patch of a Barcelona image (mirror-tiled) or the (red cell,
    background) colours of a synthetic smear. ``padding``: (side, fraction of the field) black
    bands, sides ``top``, ``bottom``, ``left``, ``right``.
    """
    cell_diameter = np.sqrt(4 * area_fraction / np.pi) * FIELD
    scale = cell_diameter / (CELL_PER_NUCLEUS * nucleus.size)
    red_diameter = RED_PER_WHITE * cell_diameter
    if isinstance(background, np.ndarray):
        field = mirror_tiled(resized(background, red_diameter / red_cell_diameter), FIELD)
    else:
        field = red_cell_field(FIELD, red_diameter, rng, *background)
    at = tuple(FIELD / 2 + rng.uniform(-0.1, 0.1, 2) * FIELD)
    field = paste_disc(field, resized(cell_image, scale), at,
                       (nucleus.cy * scale, nucleus.cx * scale), 0.525 * cell_diameter)
    for side, fraction in padding:
        band = int(fraction * FIELD)
        field[{"top": np.s_[:band], "bottom": np.s_[FIELD - band:],
               "left": np.s_[:, :band], "right": np.s_[:, FIELD - band:]}[side]] = 0
    return jpeg(field), Truth(at[0], at[1], nucleus.size * scale)
