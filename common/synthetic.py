"""Deterministic synthetic blood-smear leukocyte images from clinics with different styles.

Each image shows one white cell, roughly centred, among red cells on a light background. The
five classes differ by size, nucleus shape, chromatin and granules, so they stay recognisable
under every stain. Clinics differ like real hospitals: stain colours, magnification, optics
(blur, resolution loss, noise, brightness, contrast) and their own class mix, rare classes
included.

Drawing happens on a canvas twice the output size with a Beer-Lambert stain model: every
structure holds a concentration of four stains (nucleus, cytoplasm, red-cell eosin and
eosinophil granules), whose clinic-specific optical densities absorb the background light.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

CLASSES: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
GENERATOR_VERSION = 1

RGB = tuple[int, int, int]
# Signed distance (in cell radii, negative inside) at cell coordinates (u, v).
Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]
# Blob density from the distance to its centre (in blob radii) and its radius in pixels.
Profile = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Stain axis order: nucleus, cytoplasm, red cell (eosin), eosinophil granule.
_STAIN_COUNT = 4
_NUCLEUS_STAIN, _RED_CELL_STAIN = 0, 2
_RED_CELL_SIZE = 0.62  # red-cell diameter relative to a neutrophil


@dataclass(frozen=True)
class ClinicStyle:
    """How one clinic stains, images and samples its smears.

    Colours are 0-255 RGB; a stain colour is the light a unit concentration lets through.
    Lengths are fractions of the field width, so a style looks the same at every image size.
    """

    name: str
    background_rgb: RGB
    nucleus_rgb: RGB
    cytoplasm_rgb: RGB
    rbc_rgb: RGB
    granule_rgb: RGB
    cell_diameter: float  # neutrophil diameter; small values mean a wide field of view
    rbc_coverage: float  # share of the field covered by red cells
    blur_sigma: float  # Gaussian blur sigma
    resolution_loss: float  # >= 1: the camera resolves image_size / resolution_loss pixels
    noise_std: float  # sensor noise, 0-255 units
    brightness: float  # offset, 0-255 units
    contrast: float  # gain around mid-grey
    class_mix: tuple[float, ...]  # class probabilities in CLASSES order

    def __post_init__(self) -> None:
        mix = np.asarray(self.class_mix, dtype=float)
        if len(mix) != len(CLASSES) or (mix < 0).any() or not np.isclose(mix.sum(), 1.0):
            raise ValueError(f"clinic {self.name!r}: class_mix needs {len(CLASSES)} "
                             f"non-negative values summing to 1, got {self.class_mix}")
        if not 0 < self.cell_diameter <= 1 or self.resolution_loss < 1:
            raise ValueError(f"clinic {self.name!r}: need 0 < cell_diameter <= 1 and "
                             "resolution_loss >= 1")


_DEFAULT_CLINICS = (
    ClinicStyle(  # purple May-Grünwald-Giemsa, standard microscope
        name="clinic-a", background_rgb=(236, 232, 240), nucleus_rgb=(92, 42, 138),
        cytoplasm_rgb=(118, 148, 218), rbc_rgb=(214, 118, 132), granule_rgb=(236, 108, 52),
        cell_diameter=0.42, rbc_coverage=0.5, blur_sigma=0.004, resolution_loss=1.0,
        noise_std=2.0, brightness=0.0, contrast=1.0,
        class_mix=(0.55, 0.27, 0.09, 0.07, 0.02)),
    ClinicStyle(  # yellowish light, washed-out stain, tight crops; an allergy referral centre
        name="clinic-b", background_rgb=(244, 234, 198), nucleus_rgb=(120, 62, 132),
        cytoplasm_rgb=(150, 168, 212), rbc_rgb=(226, 140, 118), granule_rgb=(240, 124, 46),
        cell_diameter=0.64, rbc_coverage=0.45, blur_sigma=0.007, resolution_loss=1.3,
        noise_std=3.0, brightness=6.0, contrast=0.88,
        class_mix=(0.38, 0.22, 0.10, 0.25, 0.05)),
    ClinicStyle(  # bluish Wright stain, wide field, low-resolution noisy camera
        name="clinic-c", background_rgb=(218, 228, 244), nucleus_rgb=(62, 52, 150),
        cytoplasm_rgb=(96, 136, 214), rbc_rgb=(196, 126, 156), granule_rgb=(226, 104, 72),
        cell_diameter=0.3, rbc_coverage=0.6, blur_sigma=0.008, resolution_loss=1.8,
        noise_std=6.0, brightness=-4.0, contrast=1.08,
        class_mix=(0.62, 0.30, 0.06, 0.01, 0.01)),
    ClinicStyle(  # the "new" clinic: violet stain, warm light, medium field
        name="clinic-d", background_rgb=(240, 234, 226), nucleus_rgb=(88, 48, 140),
        cytoplasm_rgb=(124, 152, 214), rbc_rgb=(214, 126, 136), granule_rgb=(234, 114, 56),
        cell_diameter=0.5, rbc_coverage=0.5, blur_sigma=0.006, resolution_loss=1.4,
        noise_std=4.0, brightness=2.0, contrast=0.96,
        class_mix=(0.45, 0.28, 0.12, 0.10, 0.05)),
)


def default_clinics() -> tuple[ClinicStyle, ...]:
    """The four default clinics; the last one is the default held-out clinic."""
    return _DEFAULT_CLINICS


def clinic_by_name(name: str) -> ClinicStyle:
    """The default clinic called ``name``."""
    for style in _DEFAULT_CLINICS:
        if style.name == name:
            return style
    known = ", ".join(style.name for style in _DEFAULT_CLINICS)
    raise ValueError(f"unknown synthetic clinic {name!r}; known clinics: {known}")


# --------------------------------------------------------------------------- shapes


def _ellipse(centre: tuple[float, float], axes: tuple[float, float]) -> Shape:
    """Approximate signed distance to an axis-aligned ellipse."""
    (cx, cy), (ax, ay) = centre, axes
    return lambda u, v: (np.hypot((u - cx) / ax, (v - cy) / ay) - 1) * min(ax, ay)


def _capsule(start: np.ndarray, end: np.ndarray, radius: float) -> Shape:
    """Signed distance to a segment thickened by ``radius``."""
    direction = end - start
    length_sq = float(direction @ direction)

    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        pu, pv = u - start[0], v - start[1]
        t = np.clip((pu * direction[0] + pv * direction[1]) / length_sq, 0, 1)
        return np.hypot(pu - t * direction[0], pv - t * direction[1]) - radius

    return sdf


def _union(*shapes: Shape) -> Shape:
    return lambda u, v: np.minimum.reduce([shape(u, v) for shape in shapes])


def _minus(shape: Shape, hole: Shape) -> Shape:
    return lambda u, v: np.maximum(shape(u, v), -hole(u, v))


def _arc(rng: np.random.Generator, count: int, radius: float, span_deg: float,
         jitter: float) -> np.ndarray:
    """``count`` jittered points along a circular arc around the cell centre, shape (count, 2)."""
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.radians(span_deg) * np.linspace(0, 1, count)
    points = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return points + rng.uniform(-jitter, jitter, points.shape)


def _lobes(centres: np.ndarray, radii: np.ndarray, bridge_radius: float) -> Shape:
    """Round lobes joined in sequence by thin chromatin bridges."""
    lobes = [_ellipse(tuple(c), (r, r)) for c, r in zip(centres, radii, strict=True)]
    bridges = [_capsule(a, b, bridge_radius) for a, b in itertools.pairwise(centres)]
    return _union(*lobes, *bridges)


def _segmented_nucleus(rng: np.random.Generator) -> Shape:
    """Neutrophil: three to five small lobes strung along an arc, sometimes an unsegmented band."""
    if rng.random() < 0.15:
        centres = _arc(rng, 6, rng.uniform(0.4, 0.48), rng.uniform(160, 230), 0.02)
        return _lobes(centres, rng.uniform(0.14, 0.17, 6), 0.12)
    count = int(rng.choice([3, 4, 5], p=[0.35, 0.45, 0.2]))
    centres = _arc(rng, count, rng.uniform(0.38, 0.46), rng.uniform(55, 72) * (count - 1), 0.05)
    radii = rng.uniform(0.21, 0.27, count) * (4 / count) ** 0.3
    return _lobes(centres, radii, rng.uniform(0.04, 0.07))


def _bilobed_nucleus(rng: np.random.Generator) -> Shape:
    """Eosinophil and basophil: two lobes like spectacles."""
    half_gap, offset = rng.uniform(0.3, 0.38), rng.uniform(-0.2, 0.1)
    centres = np.array([[-half_gap, offset], [half_gap, offset + rng.uniform(-0.08, 0.08)]])
    return _lobes(centres, rng.uniform(0.23, 0.29, 2), rng.uniform(0.05, 0.08))


def _round_nucleus(rng: np.random.Generator) -> Shape:
    """Lymphocyte: a large, slightly eccentric, sometimes notched round nucleus."""
    centre = (rng.uniform(-0.1, 0.1), rng.uniform(-0.08, 0.08))
    nucleus = _ellipse(centre, (rng.uniform(0.66, 0.83), rng.uniform(0.62, 0.78)))
    if rng.random() < 0.3:
        notch = _ellipse((centre[0], centre[1] + 0.78), (0.2, 0.2))
        return _minus(nucleus, notch)
    return nucleus


def _folded_nucleus(rng: np.random.Generator) -> Shape:
    """Monocyte: a kidney-shaped or horseshoe nucleus."""
    if rng.random() < 0.5:
        axes = (rng.uniform(0.52, 0.62), rng.uniform(0.4, 0.48))
        centre = (rng.uniform(-0.08, 0.08), rng.uniform(-0.12, 0.0))
        bite_radius = rng.uniform(0.22, 0.34)
        bite = _ellipse((centre[0], centre[1] + axes[1] + 0.6 * bite_radius),
                        (bite_radius * 1.3, bite_radius))
        return _minus(_ellipse(centre, axes), bite)
    count = 7
    centres = _arc(rng, count, rng.uniform(0.34, 0.42), rng.uniform(190, 250), 0.02)
    return _lobes(centres, rng.uniform(0.2, 0.25, count), 0.15)


def _wobble(u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
            amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates displaced by a smooth random field, for irregular outlines."""
    freq, phase = rng.uniform(2.5, 5.5, 2), rng.uniform(0, 2 * np.pi, 2)
    return (u + amplitude * np.sin(freq[0] * v + phase[0]),
            v + amplitude * np.sin(freq[1] * u + phase[1]))


# --------------------------------------------------------------------------- morphology


@dataclass(frozen=True)
class _Granules:
    """Blobs scattered in the cell: granules or (with negative stain) vacuoles."""

    count: tuple[int, int]
    radius: tuple[float, float]  # cell radii
    stain: tuple[float, ...]  # concentration of each stain at a granule centre
    over_nucleus: bool


@dataclass(frozen=True)
class _Morphology:
    size: tuple[float, float]  # range of cell diameters relative to a neutrophil
    nucleus: Callable[[np.random.Generator], Shape]
    nucleus_density: float
    chromatin: float  # contrast of chromatin clumps
    cytoplasm: tuple[float, ...]  # stain concentrations of the cytoplasm
    cytoplasm_texture: float  # contrast of fine cytoplasmic granularity
    granules: tuple[_Granules, ...] = ()


_MORPHOLOGY = (  # in CLASSES order
    _Morphology(size=(0.9, 1.1), nucleus=_segmented_nucleus, nucleus_density=1.1, chromatin=0.35,
                cytoplasm=(0.05, 0.03, 0.24, 0.0), cytoplasm_texture=0.6),
    _Morphology(size=(0.62, 0.85), nucleus=_round_nucleus, nucleus_density=1.35, chromatin=0.4,
                cytoplasm=(0.0, 0.85, 0.0, 0.0), cytoplasm_texture=0.1),
    _Morphology(size=(1.1, 1.4), nucleus=_folded_nucleus, nucleus_density=0.8, chromatin=0.25,
                cytoplasm=(0.05, 0.4, 0.1, 0.0), cytoplasm_texture=0.25,
                granules=(_Granules((0, 6), (0.05, 0.1), (0.0, -0.4, -0.1, 0.0), False),)),
    _Morphology(size=(0.95, 1.15), nucleus=_bilobed_nucleus, nucleus_density=1.05, chromatin=0.3,
                cytoplasm=(0.0, 0.1, 0.1, 0.0), cytoplasm_texture=0.1,
                granules=(_Granules((150, 200), (0.08, 0.1), (0.0, 0.0, 0.0, 0.8), False),)),
    _Morphology(size=(0.82, 1.0), nucleus=_bilobed_nucleus, nucleus_density=0.7, chromatin=0.3,
                cytoplasm=(0.12, 0.1, 0.0, 0.0), cytoplasm_texture=0.1,
                granules=(_Granules((60, 90), (0.09, 0.14), (1.3, 0.4, 0.0, 0.0), True),)),
)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _CellFrame:
    """The canvas grid in rotated cell coordinates, where the cell has radius about 1."""

    centre: np.ndarray  # canvas pixels (x, y)
    radius: float  # canvas pixels
    angle: float
    u: np.ndarray
    v: np.ndarray

    def to_canvas(self, points: np.ndarray) -> np.ndarray:
        """Cell coordinates (n, 2) to canvas pixels (n, 2)."""
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        rotation = np.array([[cos, sin], [-sin, cos]])
        return self.centre + self.radius * points @ rotation


def _cell_frame(canvas: int, diameter: float, rng: np.random.Generator) -> _CellFrame:
    """A randomly rotated cell of ``diameter`` (field fraction) near the canvas centre."""
    centre = canvas * (0.5 + rng.uniform(-0.08, 0.08, 2))
    radius = canvas * diameter / 2
    angle = rng.uniform(0, 2 * np.pi)
    grid = np.arange(canvas, dtype=np.float32) + 0.5
    dx, dy = (grid[None, :] - centre[0]) / radius, (grid[:, None] - centre[1]) / radius
    cos, sin = np.cos(angle), np.sin(angle)
    return _CellFrame(centre, radius, angle, dx * cos + dy * sin, dy * cos - dx * sin)


def _coverage(sdf: np.ndarray, radius_px: float) -> np.ndarray:
    """Anti-aliased inside-fraction of each pixel from a signed distance in cell radii."""
    return np.clip(0.5 - sdf * radius_px, 0, 1)


def _membrane(frame: _CellFrame, rng: np.random.Generator) -> np.ndarray:
    """Signed distance to a slightly irregular round cell outline."""
    rho, phi = np.hypot(frame.u, frame.v), np.arctan2(frame.v, frame.u)
    harmonics = np.arange(2, 5)[:, None, None]
    amplitude = rng.uniform(0, 0.035, 3)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, 3)[:, None, None]
    return rho - 1 - (amplitude * np.cos(harmonics * phi + phase)).sum(axis=0)


def _texture(rng: np.random.Generator, canvas: int, sigma: float) -> np.ndarray:
    """Smooth zero-mean noise with unit standard deviation."""
    noise = gaussian_filter(rng.standard_normal((canvas, canvas), dtype=np.float32), sigma)
    return noise / (noise.std() + 1e-6)


def _splat(canvas: int, centres: np.ndarray, radii: np.ndarray, weights: np.ndarray,
           profile: Profile) -> np.ndarray:
    """Sum of round blobs at canvas positions ``centres`` (n, 2) with pixel ``radii`` (n,)."""
    if len(centres) == 0:
        return np.zeros((canvas, canvas), np.float32)
    half = int(np.ceil(radii.max())) + 1
    offsets = np.arange(-half, half + 1)
    corner = np.floor(centres).astype(np.int64)
    xs = corner[:, 0, None, None] + offsets[None, None, :]
    ys = corner[:, 1, None, None] + offsets[None, :, None]
    size = radii[:, None, None]
    dist = np.hypot(xs + 0.5 - centres[:, 0, None, None], ys + 0.5 - centres[:, 1, None, None])
    values = np.broadcast_to(profile(dist / size, size) * weights[:, None, None], dist.shape)
    inside = (xs >= 0) & (xs < canvas) & (ys >= 0) & (ys < canvas)
    flat = np.broadcast_to(ys * canvas + xs, dist.shape)
    total = np.bincount(flat[inside], values[inside], minlength=canvas * canvas)
    return total.reshape(canvas, canvas).astype(np.float32)


def _granule_profile(dist: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """A soft Gaussian blob."""
    return np.exp(-2.5 * dist**2)


def _red_cell_profile(dist: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """A biconcave disc: darker rim, pale centre, anti-aliased edge."""
    body = np.clip((1 - dist) * radius_px + 0.5, 0, 1)
    pallor = 0.5 * np.exp(-((dist / 0.45) ** 2))
    rim = 0.15 * np.exp(-(((dist - 0.85) / 0.12) ** 2))
    return body * (1 - pallor + rim)


def _scatter_granules(frame: _CellFrame, granules: _Granules, nucleus: Shape, canvas: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Stain concentrations (canvas, canvas, _STAIN_COUNT) of one kind of granule."""
    count = int(rng.integers(granules.count[0], granules.count[1] + 1))
    rho, phi = 0.9 * np.sqrt(rng.random(count)), rng.uniform(0, 2 * np.pi, count)
    points = np.stack([rho * np.cos(phi), rho * np.sin(phi)], axis=1)
    radii = rng.uniform(*granules.radius, count)
    if not granules.over_nucleus:
        keep = nucleus(points[:, 0], points[:, 1]) > 0
        points, radii = points[keep], radii[keep]
    strength = rng.uniform(0.8, 1.2, len(points))
    density = _splat(canvas, frame.to_canvas(points), radii * frame.radius, strength,
                     _granule_profile)
    return density[..., None] * np.asarray(granules.stain, np.float32)


def _white_cell(frame: _CellFrame, morphology: _Morphology, canvas: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stain concentrations (canvas, canvas, _STAIN_COUNT) of the cell, and its coverage mask."""
    cell = _coverage(_membrane(frame, rng), frame.radius)
    nucleus = morphology.nucleus(rng)
    u, v = _wobble(frame.u, frame.v, rng, rng.uniform(0.02, 0.05))
    nucleus_mask = _coverage(nucleus(u, v), frame.radius) * cell
    chromatin = _texture(rng, canvas, max(0.06 * frame.radius, 0.6))
    granularity = _texture(rng, canvas, 0.6)
    stains = np.zeros((canvas, canvas, _STAIN_COUNT), np.float32)
    stains[..., _NUCLEUS_STAIN] = nucleus_mask * morphology.nucleus_density * np.clip(
        1 + morphology.chromatin * chromatin, 0.3, None)
    cytoplasm = (cell - nucleus_mask) * np.clip(
        1 + morphology.cytoplasm_texture * granularity, 0, None)
    stains += cytoplasm[..., None] * np.asarray(morphology.cytoplasm, np.float32)
    for granules in morphology.granules:
        stains += _scatter_granules(frame, granules, nucleus, canvas, rng) * cell[..., None]
    return stains, cell


def _red_cell_centres(count: int, radius: float, canvas: int, keep_out: tuple[np.ndarray, float],
                      rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` red-cell centres that overlap each other only a little."""
    candidates = rng.uniform(-radius, canvas + radius, (3 * count, 2))
    centre, distance = keep_out
    candidates = candidates[np.hypot(*(candidates - centre).T) > distance]
    gaps = np.hypot(*(candidates[:, None] - candidates[None, :]).transpose(2, 0, 1))
    too_close = gaps < radius * rng.uniform(1.4, 1.8)
    blocked = np.zeros(len(candidates), bool)
    chosen: list[int] = []
    for index in range(len(candidates)):
        if len(chosen) == count:
            break
        if not blocked[index]:
            chosen.append(index)
            blocked |= too_close[index]
    return candidates[chosen]


def _red_cells(style: ClinicStyle, frame: _CellFrame, canvas: int,
               rng: np.random.Generator) -> np.ndarray:
    """Red-cell stain concentration (canvas, canvas) around the white cell."""
    radius = canvas * style.cell_diameter * _RED_CELL_SIZE / 2
    area = (canvas + 2 * radius) ** 2
    count = int(style.rbc_coverage * rng.uniform(0.5, 1.4) * area / (np.pi * radius**2))
    keep_out = (frame.centre, 0.95 * frame.radius + 0.3 * radius)
    centres = _red_cell_centres(count, radius, canvas, keep_out, rng)
    radii = radius * rng.uniform(0.9, 1.08, len(centres))
    return _splat(canvas, centres, radii, rng.uniform(0.75, 1.0, len(centres)), _red_cell_profile)


def _platelets(canvas: int, diameter: float, rng: np.random.Generator) -> np.ndarray:
    """A few small purple platelets, nucleus-stain concentration (canvas, canvas)."""
    count = int(rng.integers(0, 4))
    centres = rng.uniform(0, canvas, (count, 2))
    radii = rng.uniform(0.05, 0.08, count) * canvas * diameter
    return _splat(canvas, centres, radii, rng.uniform(0.5, 0.9, count), _granule_profile)


def _stain_densities(style: ClinicStyle, rng: np.random.Generator) -> np.ndarray:
    """Optical density (_STAIN_COUNT, 3) of each stain, with slide-to-slide variation."""
    colours = (style.nucleus_rgb, style.cytoplasm_rgb, style.rbc_rgb, style.granule_rgb)
    density = -np.log(np.clip(np.asarray(colours, np.float32) / 255, 1e-3, 1))
    return density * rng.uniform(0.85, 1.15, (_STAIN_COUNT, 1)).astype(np.float32)


def _illumination(style: ClinicStyle, canvas: int, rng: np.random.Generator) -> np.ndarray:
    """Background light (canvas, canvas, 3) with a gentle random gradient."""
    grid = (np.arange(canvas, dtype=np.float32) + 0.5) / canvas - 0.5
    slope = rng.uniform(-0.06, 0.06, 2)
    gain = 1 + slope[0] * grid[None, :] + slope[1] * grid[:, None]
    colour = np.asarray(style.background_rgb, np.float32) + rng.uniform(-4, 4, 3)
    return gain[..., None] * colour


def _apply_optics(light: np.ndarray, style: ClinicStyle, image_size: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Blur, downsample, lose resolution, adjust exposure and add noise; returns uint8."""
    sigma = style.blur_sigma * light.shape[0]
    blurred = gaussian_filter(light, (sigma, sigma, 0)) if sigma > 0 else light
    factor = light.shape[0] // image_size
    image = blurred.reshape(image_size, factor, image_size, factor, 3).mean(axis=(1, 3))
    resolved = max(1, round(image_size / style.resolution_loss))
    if resolved < image_size:
        low = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        low = low.resize((resolved, resolved), Image.Resampling.BOX)
        image = np.asarray(low.resize((image_size, image_size), Image.Resampling.BILINEAR),
                           np.float32)
    image = (image - 128) * style.contrast + 128 + style.brightness
    image = image + rng.normal(0, style.noise_std, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _render(style: ClinicStyle, label: int, image_size: int,
            rng: np.random.Generator) -> np.ndarray:
    """One uint8 (image_size, image_size, 3) image of a cell of class ``label``."""
    canvas = 2 * image_size
    morphology = _MORPHOLOGY[label]
    diameter = style.cell_diameter * rng.uniform(*morphology.size)
    frame = _cell_frame(canvas, diameter, rng)
    stains, cell = _white_cell(frame, morphology, canvas, rng)
    stains[..., _RED_CELL_STAIN] += _red_cells(style, frame, canvas, rng) * (1 - 0.8 * cell)
    stains[..., _NUCLEUS_STAIN] += _platelets(canvas, style.cell_diameter, rng) * (1 - cell)
    optical_density = np.maximum(stains @ _stain_densities(style, rng), 0)
    light = _illumination(style, canvas, rng) * np.exp(-optical_density)
    return _apply_optics(light, style, image_size, rng)


def generate_clinic(style: ClinicStyle, n_images: int, image_size: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_images`` synthetic images of one clinic: uint8 (n, S, S, 3) and int64 labels (n,).

    Labels are drawn from ``style.class_mix``; everything is a pure function of the arguments.
    """
    if n_images < 0 or image_size < 8:
        raise ValueError(f"need n_images >= 0 and image_size >= 8, got {n_images}, {image_size}")
    root = np.random.SeedSequence([seed, zlib.crc32(style.name.encode())])
    label_seed, *image_seeds = root.spawn(n_images + 1)
    labels = np.random.default_rng(label_seed).choice(
        len(CLASSES), size=n_images, p=np.asarray(style.class_mix) / sum(style.class_mix))
    images = np.zeros((n_images, image_size, image_size, 3), np.uint8)
    for index, (label, image_seed) in enumerate(zip(labels, image_seeds, strict=True)):
        images[index] = _render(style, int(label), image_size, np.random.default_rng(image_seed))
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------- cache


def _cache_path(style: ClinicStyle, n_images: int, image_size: int, seed: int,
                cache_dir: Path) -> Path:
    key = json.dumps([dataclasses.asdict(style), n_images, image_size, seed, GENERATOR_VERSION],
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / "synthetic" / f"{style.name}-{image_size}px-{n_images}-{digest}.npz"


def _write_atomically(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, images=images, labels=labels)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_clinic(name: str, image_size: int, cache_dir: Path, n_images: int = 600,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``generate_clinic`` for a default clinic, cached under ``cache_dir/synthetic``."""
    style = clinic_by_name(name)
    path = _cache_path(style, n_images, image_size, seed, cache_dir)
    if path.exists():
        with np.load(path) as cached:
            return cached["images"], cached["labels"]
    images, labels = generate_clinic(style, n_images, image_size, seed)
    _write_atomically(path, images, labels)
    return images, labels
