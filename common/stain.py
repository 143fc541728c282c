"""Stain statistics of a site, stain normalisation and re-staining towards other sites' styles.

A site summarises its stain in a :class:`StainStats` (numbers, never images): the two dominant
optical-density directions of its pixels, haematoxylin (nuclei) first and eosin second, and
their 99th-percentile concentrations (Macenko et al. 2009, "A method for normalizing histology
slides for quantitative analysis"), plus the mean and standard deviation of its pixels in
CIELAB (Reinhard et al. 2001, "Color transfer between images"). Received statistics are
validated so that a malicious site cannot make another site's images NaN: every transform here
is bounded by the checked ranges and its output is clamped to [0, 1].

:class:`Restainer` re-stains a training batch on the device towards the pooled styles of the
other sites (federated style sharing in the spirit of CCST, Chen et al. 2023, "Federated
domain generalization for image recognition via cross-client style transfer").
:class:`ReinhardNormaliser` normalises each image to a fixed reference, identically at training
and prediction time.

Optical density is ``OD = -ln(max(I, 1/255))`` for intensities ``I`` in [0, 1].
Ops take float (B, 3, H, W) images in [0, 1] as ``common.augment`` does; the normalisers also
take uint8 (B, H, W, 3) batches and then return uint8 batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.augment import chance

OD_FLOOR = 1 / 255  # darkest intensity before taking the optical density
TRANSPARENT_OD = 0.15  # Macenko's beta: pixels with OD below it in a channel are background
ANGLE_PERCENTILE = 0.01  # Macenko's alpha: robust extremes of the stain angle
CONCENTRATION_PERCENTILE = 0.99
MIN_STAINED_PIXELS = 64  # fewer stained pixels than this: no stain matrix can be estimated
SITE_PIXELS = 1 << 20  # pixels sampled from a site's images for its statistics

# Ranges every StainStats must satisfy (what a received one is checked against).
MIN_STAIN_ANGLE_DEG = 5.0  # between the two stain vectors: keeps their inverse well-conditioned
CONCENTRATION_RANGE = (0.05, 10.0)
LAB_MEAN_RANGE = ((0.0, 100.0), (-128.0, 128.0), (-128.0, 128.0))
LAB_STD_RANGE = (1.0, 100.0)

# sRGB (D65) <-> CIE XYZ and the D65 white point (IEC 61966-2-1).
XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                (0.212671, 0.715160, 0.072169),
                (0.019334, 0.119193, 0.950227))
D65_WHITE = (0.950456, 1.0, 1.088754)
LAB_DELTA = 6 / 29


# ---------------------------------------------------------------------------------------------
# Colour spaces


def optical_density(x: Tensor) -> Tensor:
    """Optical density ``-ln(I)`` of intensities in [0, 1], floored at ``OD_FLOOR``."""
    return -x.clamp(OD_FLOOR, 1.0).log()


def from_optical_density(density: Tensor) -> Tensor:
    """Intensities in [0, 1] from optical densities (inverse of :func:`optical_density`)."""
    return torch.exp(-density.clamp_min(0.0)).clamp(0.0, 1.0)


def _constant(values: Sequence, like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def rgb_to_lab(x: Tensor) -> Tensor:
    """CIELAB (D65) of sRGB values in [0, 1]: images (..., 3, H, W) or pixel lists (P, 3)."""
    channels_last = x.ndim == 2
    rgb = x if channels_last else x.movedim(-3, -1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).pow(2.4))
    xyz = linear @ _constant(XYZ_FROM_RGB, x).T / _constant(D65_WHITE, x)
    f = torch.where(xyz > LAB_DELTA**3, xyz.clamp_min(1e-12).pow(1 / 3),
                    xyz / (3 * LAB_DELTA**2) + 4 / 29)
    lab = torch.stack((116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                       200 * (f[..., 1] - f[..., 2])), dim=-1)
    return lab if channels_last else lab.movedim(-1, -3)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """sRGB in [0, 1] (clamped) of CIELAB values; inverse of :func:`rgb_to_lab`."""
    channels_last = lab.ndim == 2
    values = lab if channels_last else lab.movedim(-3, -1)
    fy = (values[..., 0] + 16) / 116
    f = torch.stack((fy + values[..., 1] / 500, fy, fy - values[..., 2] / 200), dim=-1)
    xyz = torch.where(f > LAB_DELTA, f.pow(3), 3 * LAB_DELTA**2 * (f - 4 / 29))
    linear = (xyz * _constant(D65_WHITE, lab)) @ torch.linalg.inv(_constant(XYZ_FROM_RGB, lab)).T
    linear = linear.clamp(0.0, 1.0)
    rgb = torch.where(linear <= 0.0031308, 12.92 * linear,
                      1.055 * linear.clamp_min(1e-12).pow(1 / 2.4) - 0.055)
    rgb = rgb.clamp(0.0, 1.0)
    return rgb if channels_last else rgb.movedim(-1, -3)


# ---------------------------------------------------------------------------------------------
# Macenko stain estimation


def macenko_stain_matrix(density: Tensor) -> Tensor | None:
    """Stain matrix (2, 3) of optical-density pixels (P, 3), or None if it is not estimable.

    Macenko et al. 2009: the pixels with OD >= ``TRANSPARENT_OD`` in every channel, the plane
    of their two principal directions, the ``ANGLE_PERCENTILE`` and ``1 - ANGLE_PERCENTILE``
    quantiles of their angle in that plane, and the two unit vectors at those angles (negative
    components, estimation noise for light-absorbing stains, clipped to 0), the one absorbing
    more red (haematoxylin) first. None with fewer than ``MIN_STAINED_PIXELS`` stained pixels or
    two vectors closer than ``MIN_STAIN_ANGLE_DEG``.
    """
    stained = density[(density >= TRANSPARENT_OD).all(dim=-1)]
    if len(stained) < MIN_STAINED_PIXELS:
        return None
    _, vectors = torch.linalg.eigh(torch.cov(stained.T))  # ascending eigenvalues
    plane = vectors[:, [2, 1]]
    plane = plane * torch.where(plane.sum(dim=0) < 0, -1.0, 1.0)
    projected = stained @ plane
    angle = torch.atan2(projected[:, 1], projected[:, 0])
    extremes = torch.quantile(angle, _constant((ANGLE_PERCENTILE, 1 - ANGLE_PERCENTILE), angle))
    stains = (torch.stack((extremes.cos(), extremes.sin()), dim=-1) @ plane.T).clamp_min(0.0)
    stains = stains / stains.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if stains[0, 0] < stains[1, 0]:
        stains = stains.flip(0)
    cosine = float(stains[0] @ stains[1])
    if not torch.isfinite(stains).all() or cosine > math.cos(math.radians(MIN_STAIN_ANGLE_DEG)):
        return None
    return stains


# ---------------------------------------------------------------------------------------------
# A site's statistics


STYLE_SIZES = {"stain_matrix": 6, "max_concentrations": 2, "lab_mean": 3, "lab_std": 3}


@dataclass(frozen=True)
class StainStats:
    """A site's stain style: what it may share with the federation (numbers only).

    ``stain_matrix``: haematoxylin and eosin unit optical-density vectors (R, G, B), in that
    order; ``max_concentrations``: their 99th-percentile concentrations; ``lab_mean`` and
    ``lab_std``: CIELAB mean and standard deviation of the site's pixels. :meth:`validate`
    checks the ranges above; :meth:`from_dict` and every op taking a style call it.
    """

    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_concentrations: tuple[float, float]
    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]

    def validate(self, source: str = "stain statistics") -> StainStats:
        """``self`` if every field is in range, else a ValueError naming ``source`` and field."""
        rows = np.array(_floats([v for row in self.stain_matrix for v in row], 6,
                                "stain_matrix", source)).reshape(2, 3)
        norms = np.linalg.norm(rows, axis=1)
        if (np.abs(norms - 1) > 1e-3).any() or rows.min() < 0 or (
                rows[0] @ rows[1] > math.cos(math.radians(MIN_STAIN_ANGLE_DEG))):
            raise ValueError(f"{source}: field 'stain_matrix' must be two unit optical-density "
                             f"vectors with non-negative components, at least "
                             f"{MIN_STAIN_ANGLE_DEG} degrees apart")
        for name, bounds in (("max_concentrations", [CONCENTRATION_RANGE] * 2),
                             ("lab_mean", LAB_MEAN_RANGE), ("lab_std", [LAB_STD_RANGE] * 3)):
            values = _floats(getattr(self, name), len(bounds), name, source)
            if not all(low <= v <= high for v, (low, high) in zip(values, bounds, strict=True)):
                raise ValueError(f"{source}: field {name!r} must lie in "
                                 f"{[list(b) for b in bounds]}, got {list(values)}")
        return self

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists of floats (a Flower ConfigRecord carries them); the matrix row-major."""
        return {"stain_matrix": [v for row in self.stain_matrix for v in row],
                "max_concentrations": list(self.max_concentrations),
                "lab_mean": list(self.lab_mean), "lab_std": list(self.lab_std)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], source: str = "stain statistics") -> StainStats:
        """Checked inverse of :meth:`to_dict`; errors name ``source`` (for example the site)."""
        if not isinstance(record, Mapping):
            raise ValueError(f"{source}: expected a record of fields, got {type(record).__name__}")
        unknown = sorted(set(record) - set(STYLE_SIZES))
        missing = sorted(set(STYLE_SIZES) - set(record))
        if unknown or missing:
            raise ValueError(f"{source}: expected fields {', '.join(STYLE_SIZES)}; missing "
                             f"{missing}, unknown {unknown}")
        values = {name: _floats(record[name], size, name, source)
                  for name, size in STYLE_SIZES.items()}
        matrix = values.pop("stain_matrix")
        return cls(stain_matrix=(matrix[:3], matrix[3:]), **values).validate(source)


def _floats(value: Any, length: int, name: str, source: str) -> tuple[float, ...]:
    """``value`` as ``length`` finite floats, or a ValueError naming ``source`` and ``name``."""
    numeric = (int, float, np.integer, np.floating)
    if (isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray)
            or len(value) != length
            or not all(isinstance(v, numeric) and not isinstance(v, bool) for v in value)
            or not all(math.isfinite(v) for v in value)):
        raise ValueError(f"{source}: field {name!r} must be a list of {length} finite numbers")
    return tuple(float(v) for v in value)


def site_stain_stats(images: np.ndarray, max_pixels: int = SITE_PIXELS,
                     seed: int = 0) -> StainStats:
    """The :class:`StainStats` of a site's uint8 images (N, S, S, 3).

    At most ``max_pixels`` pixels, drawn uniformly (with replacement) by a seeded generator,
    are used. Raises a ValueError when the images are not uint8 RGB or hold too few stained
    pixels to estimate a stain matrix (blank images, for example): such a site has no style.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"stain statistics need uint8 images (N, S, S, 3), got {images.dtype} "
                         f"{images.shape}")
    flat = images.reshape(-1, 3)
    if len(flat) > max_pixels:
        flat = flat[np.random.default_rng(seed).integers(len(flat), size=max_pixels)]
    pixels = torch.from_numpy(flat).double().div_(255)
    density = optical_density(pixels)
    stains = macenko_stain_matrix(density)
    if stains is None:
        raise ValueError(f"stain statistics: the {len(flat)} pixels sampled give no stain "
                         f"matrix (fewer than {MIN_STAINED_PIXELS} stained pixels or a single "
                         "stain colour)")
    concentrations = density @ torch.linalg.pinv(stains)  # least squares, (P, 2)
    top = torch.quantile(concentrations, CONCENTRATION_PERCENTILE, dim=0)
    lab = rgb_to_lab(pixels)
    return StainStats(
        stain_matrix=tuple(tuple(row) for row in stains.tolist()),
        max_concentrations=tuple(top.clamp(*CONCENTRATION_RANGE).tolist()),
        lab_mean=tuple(lab.mean(dim=0).tolist()),
        lab_std=tuple(lab.std(dim=0).clamp(*LAB_STD_RANGE).tolist())).validate()


def style_pool(shared: Mapping[str, StainStats], site: str | None = None) -> list[StainStats]:
    """The styles ``site`` may re-stain towards: every other site's, in site-name order."""
    return [shared[name] for name in sorted(shared) if name != site]


def pack_styles(styles: Sequence[StainStats]) -> dict[str, list[float]]:
    """Several styles as one flat record (one ConfigRecord): each field's lists concatenated."""
    records = [style.to_dict() for style in styles]
    return {name: [v for record in records for v in record[name]] for name in STYLE_SIZES}


def unpack_styles(record: Mapping[str, Any], source: str = "style pool") -> list[StainStats]:
    """Checked inverse of :func:`pack_styles`."""
    lengths = {name: len(record.get(name, ())) for name in STYLE_SIZES}
    count = lengths["stain_matrix"] // STYLE_SIZES["stain_matrix"]
    if any(lengths[name] != count * size for name, size in STYLE_SIZES.items()):
        raise ValueError(f"{source}: expected fields {', '.join(STYLE_SIZES)} holding "
                         f"{', '.join(map(str, STYLE_SIZES.values()))} numbers per style, got "
                         f"lengths {lengths}")
    return [StainStats.from_dict({name: list(record[name])[i * size:(i + 1) * size]
                                  for name, size in STYLE_SIZES.items()}, f"{source}, style {i}")
            for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Ops on batches


def on_unit_floats(transform: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply ``transform`` (float (B, 3, H, W) in [0, 1] -> same) to float or uint8 batches.

    A uint8 (B, H, W, 3) batch is converted and the result rounded back to uint8 (B, H, W, 3).
    """
    if x.dtype != torch.uint8:
        return transform(x)
    out = transform(x.permute(0, 3, 1, 2).float().div(255))
    return out.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


RESTAIN_METHODS = ("reinhard", "macenko")


class Restainer(nn.Module):
    """Re-stain each image, with probability ``probability``, from the site's own style to a
    style drawn uniformly from ``styles`` (the other sites'), on the device, batched.

    ``macenko``: optical densities are unmixed with the site's stain matrix, each stain's
    concentration is scaled by the ratio of the target's 99th-percentile concentration to the
    site's, and the stains are recomposed with the target's matrix (as in Macenko's
    normalisation, the OD outside the site's stain plane is dropped: kept, it tinted re-stained
    real images green).
    ``reinhard`` (the default: its re-stained real images looked the more natural of the two,
    see ``simulations/stain_bench.py --figure``): per CIELAB channel, the site's mean and spread
    are mapped to the target's. Both are one affine map per style, precomputed, so a batch
    costs one colour conversion and back.
    """

    def __init__(self, own: StainStats, styles: Sequence[StainStats], method: str = "reinhard",
                 probability: float = 0.5) -> None:
        super().__init__()
        if method not in RESTAIN_METHODS:
            raise ValueError(f"unknown re-staining method {method!r}; known: "
                             f"{', '.join(RESTAIN_METHODS)}")
        if not styles:
            raise ValueError("re-staining needs at least one style in the pool")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"re-staining probability must be in [0, 1], got {probability}")
        own = own.validate("own stain statistics")
        styles = [style.validate(f"style {i} of the pool") for i, style in enumerate(styles)]
        self.method, self.probability = method, probability
        if method == "macenko":
            self.register_buffer("maps", torch.stack([_od_map(own, s) for s in styles]),
                                 persistent=False)
        else:
            own_mean, own_std = (torch.tensor(v, dtype=torch.float64)
                                 for v in (own.lab_mean, own.lab_std))
            scale = torch.tensor([s.lab_std for s in styles], dtype=torch.float64) / own_std
            shift = torch.tensor([s.lab_mean for s in styles], dtype=torch.float64) - (
                own_mean * scale)
            self.register_buffer("maps", torch.stack((scale, shift), dim=1).float(),
                                 persistent=False)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Float (B, 3, H, W) in [0, 1] -> re-stained images of the same shape, in [0, 1]."""
        target = torch.randint(len(self.maps), (x.shape[0],), device=x.device,
                               generator=generator)
        apply = chance(self.probability, x, generator)
        maps = self.maps.to(x.device)[target]
        if self.method == "macenko":
            density = torch.einsum("bchw,bcd->bdhw", optical_density(x), maps)
            out = from_optical_density(density)
        else:
            lab = rgb_to_lab(x) * per_channel(maps[:, 0]) + per_channel(maps[:, 1])
            out = lab_to_rgb(lab)
        return torch.where(apply, out, x)


def per_channel(values: Tensor) -> Tensor:
    """(B, 3) values to broadcast over (B, 3, H, W)."""
    return values[:, :, None, None]


def _od_map(own: StainStats, target: StainStats) -> Tensor:
    """(3, 3) map of row OD vectors from ``own``'s stain style to ``target``'s."""
    own_matrix = torch.tensor(own.stain_matrix, dtype=torch.float64)
    unmix = torch.linalg.pinv(own_matrix)  # (3, 2)
    ratio = torch.tensor(target.max_concentrations, dtype=torch.float64) / torch.tensor(
        own.max_concentrations, dtype=torch.float64)
    recompose = ratio[:, None] * torch.tensor(target.stain_matrix, dtype=torch.float64)
    return (unmix @ recompose).float()


# A fixed reference style for normalisation: the Barcelona centre (CellaVision DM96, May-
# Grunwald-Giemsa), all 6,179 images of its cell-centred view at 96 px: stain matrix and
# concentrations from ``site_stain_stats``, CIELAB mean and spread as the mean of its images'
# own (what ``ReinhardNormaliser`` maps every image to).
REFERENCE_STYLE = StainStats(stain_matrix=((0.482, 0.865, 0.141), (0.096, 0.928, 0.360)),
                             max_concentrations=(2.58, 0.79),
                             lab_mean=(76.2, 12.9, 4.0), lab_std=(18.6, 11.0, 17.6))


class ReinhardNormaliser(nn.Module):
    """Per-image colour normalisation to a fixed reference (Reinhard et al. 2001): each image's
    CIELAB mean and standard deviation are mapped to the reference's, channel by channel.

    Deterministic and needs no site statistics; float (B, 3, H, W) or uint8 (B, H, W, 3) in,
    the same type out.
    """

    def __init__(self, reference: StainStats = REFERENCE_STYLE) -> None:
        super().__init__()
        reference = reference.validate("reference style")
        self.register_buffer("lab_mean", torch.tensor(reference.lab_mean), persistent=False)
        self.register_buffer("lab_std", torch.tensor(reference.lab_std), persistent=False)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return on_unit_floats(self.normalise, x)

    def normalise(self, x: Tensor) -> Tensor:
        lab = rgb_to_lab(x)
        mean = lab.mean(dim=(-2, -1), keepdim=True)
        std = lab.std(dim=(-2, -1), keepdim=True).clamp_min(LAB_STD_RANGE[0])
        target_mean, target_std = (v.to(x.device)[None, :, None, None]
                                   for v in (self.lab_mean, self.lab_std))
        return lab_to_rgb((lab - mean) / std * target_std + target_mean)


# Per-image Macenko normalisation is left out on purpose: on 256 cell crops (96 px) of each
# shared centre it moved the reference centre's own images by a mean CIELAB distance of 49
# (Reinhard: 3.5) and left the centres' mean colours 22.5 apart (untouched: 23.8, Reinhard:
# 0.5); a crop holds too few stained pixels for a stable per-image stain matrix
# (simulations/results/stain-bench-cpu-2026-12-01.md).
STAIN_NORMALISERS: dict[str, type[nn.Module]] = {"reinhard": ReinhardNormaliser}


def build_stain_normaliser(name: str) -> nn.Module | None:
    """The named per-image normaliser, or None for ``none``."""
    if name == "none":
        return None
    if name not in STAIN_NORMALISERS:
        raise ValueError(f"unknown stain normalisation {name!r}; known: none, "
                         f"{', '.join(STAIN_NORMALISERS)}")
    return STAIN_NORMALISERS[name]()
