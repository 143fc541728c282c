"""Batched, on-device image augmentation for training on uint8 (N, H, W, 3) tensors.

Every op takes float images in [0, 1] of shape (B, 3, H, W), draws its per-image randomness from
one ``torch.Generator`` on the images' device and works on the whole batch at once with tensor
ops: no per-image Python loop, no host round-trip, no synchronisation with the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601
OD_EPSILON = 1e-6  # smallest transmittance before taking the optical density
# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin, eosin and DAB (rows).
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))


@dataclass(frozen=True)
class AugmentHParams:
    """Every probability and range of every augmentation, with its default."""

    flip_p: float = 0.5  # per axis
    crop_scale: tuple[float, float] = (0.7, 1.0)  # crop area as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    hed_scale: float = 0.1  # alpha ~ U(1 - s, 1 + s) per stain channel
    hed_shift: float = 0.05  # beta ~ U(-b, b) per stain channel, optical-density units (ln)
    hed_strong_scale: float = 0.2  # "HED-strong" of Tellez et al. 2019: alpha ~ U(0.8, 1.2)
    hed_strong_shift: float = 0.2  # and beta ~ U(-0.2, 0.2)
    hue: float = 0.04  # hue shift ~ U(-h, h), fraction of the colour circle
    saturation: float = 0.3  # saturation factor ~ U(1 - s, 1 + s)
    brightness: float = 0.2  # value factor ~ U(1 - b, 1 + b)
    grayscale_p: float = 0.1
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.5)  # pixels
    downscale_p: float = 0.3
    downscale_factor: tuple[float, float] = (1.25, 3.0)
    noise_p: float = 0.3
    noise_std: tuple[float, float] = (0.0, 0.03)  # in [0, 1] intensity units


def uniform(low: float, high: float, x: Tensor, generator: torch.Generator | None,
            channels: int | None = None) -> Tensor:
    """U(low, high) draws on ``x``'s device: one per image, shape (B,), or (B, channels)."""
    shape = (x.shape[0],) if channels is None else (x.shape[0], channels)
    return low + (high - low) * torch.rand(shape, device=x.device, generator=generator)


def per_image(values: Tensor) -> Tensor:
    """Reshape (B,) values to broadcast over (B, C, H, W)."""
    return values.view(-1, 1, 1, 1)


def chance(p: float, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """One Bernoulli(p) draw per image of ``x``, as a (B, 1, 1, 1) bool mask."""
    return per_image(uniform(0.0, 1.0, x, generator).lt(p))


def channel_stats(values: Sequence[float], device: torch.device | None = None) -> Tensor:
    """Per-channel constants as a (1, 3, 1, 1) float32 tensor."""
    return torch.tensor(tuple(values), dtype=torch.float32, device=device).view(1, 3, 1, 1)


def sample_at(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Bilinear samples of ``x`` on a per-image separable grid.

    ``rows`` (B, H') and ``cols`` (B, W') are continuous pixel coordinates in which pixel ``j``
    covers [j, j + 1); the result is (B, C, H', W'). Outside the image the border is repeated.
    """
    height, width = x.shape[-2:]
    grid_y = rows * (2 / height) - 1
    grid_x = cols * (2 / width) - 1
    grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pixel_centres(size: int, x: Tensor) -> Tensor:
    """Coordinates 0.5, 1.5, ..., size - 0.5 as a (1, size) tensor on ``x``'s device."""
    return (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5)[None]


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with one ``sigma`` (B,) per image, kernel radius ``radius``.

    A grouped convolution over the batch folded into channels; reflect padding at the borders.
    """
    batch, channels, height, width = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigma[:, None].clamp_min(1e-3)) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    groups = batch * channels
    flat = F.pad(x.reshape(1, groups, height, width), (radius, radius, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kernels[:, None, None, :], groups=groups)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernels[:, None, :, None], groups=groups)
    return flat.reshape(batch, channels, height, width)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] to HSV, hue as a fraction of the colour circle."""
    red, green, blue = x.unbind(dim=1)
    value, _ = x.max(dim=1)
    delta = value - x.amin(dim=1)
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(value == red, ((green - blue) / safe_delta) % 6,
                      torch.where(value == green, (blue - red) / safe_delta + 2,
                                  (red - green) / safe_delta + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(value))
    return torch.stack((hue, saturation, value), dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of ``rgb_to_hsv`` (closed form f(n) = V - V S clamp(min(k, 4 - k), 0, 1))."""
    hue, saturation, value = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = (5 - 2 * torch.arange(3, device=x.device, dtype=x.dtype)).view(1, 3, 1, 1)  # 5, 3, 1
    k = (n + hue * 6) % 6
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


class Augmentation(nn.Module):
    """One random op on float (B, 3, H, W) images in [0, 1]; the output is clamped to [0, 1].

    Constant tensors are buffers: after ``.to(device)`` nothing is copied per batch.
    """

    def __init__(self, hparams: AugmentHParams) -> None:
        super().__init__()
        self.hparams = hparams

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.transform(x, generator).clamp(0, 1)

    def transform(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError


class Flip(Augmentation):
    """Horizontal and vertical flips, each with probability ``flip_p`` per image."""

    def transform(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        x = torch.where(chance(self.hparams.flip_p, x, generator), x.flip(-1), x)
        return torch.where(chance(self.hparams.flip_p, x, generator), x.flip(-2), x)


class Rot90(Augmentation):
    """Rotation by a uniformly random multiple of 90 degrees per (square) image."""

    def transform(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"rot90 needs square images, got {tuple(x.shape[-2:])}")
        turns = per_image(torch.randint(4, (x.shape[0],), device=x.device, generator=generator))
        out = x
        for k in (1, 2, 3):
            out = torch.where(turns == k, torch.rot90(x, k, dims=(-2, -1)), out)
        return out


class ResizedCrop(Augmentation):
    """Random crop of area ``crop_scale`` and aspect ``crop_ratio`` resized to the input size."""

    def transform(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        hp = self.hparams
        height, width = x.shape[-2:]
        area = uniform(*hp.crop_scale, x, generator)
        log_ratio = uniform(math.log(hp.crop_ratio[0]), math.log(hp.crop_ratio[1]), x, generator)
        crop_w = (area * log_ratio.exp()).sqrt().clamp(max=1)
        crop_h = (area / log_ratio.exp()).sqrt().clamp(max=1)
        left = uniform(0.0, 1.0, x, generator) * (1 - crop_w)
        top = uniform(0.0, 1.0, x, generator) * (1 - crop_h)
        rows = (top[:, None] + pixel_centres(height, x) / height * crop_h[:, None]) * height
        cols = (left[:, None] + pixel_centres(width, x) / width * crop_w[:, None]) * width
        return sample_at(x, rows, cols)


class HedJitter(Augmentation):
    """Stain jitter in HED colour-deconvolution space (Tellez et al. 2018).

    RGB -> optical density -> haematoxylin/eosin/DAB with the Ruifrok-Johnston matrix; each
    stain channel is scaled by alpha ~ U(1 - hed_scale, 1 + hed_scale) and shifted by
    beta ~ U(-hed_shift, hed_shift) per image, then mapped back to RGB.
    """

    def __init__(self, hparams: AugmentHParams) -> None:
        super().__init__(hparams)
        self.scale, self.shift = self.ranges(hparams)
        rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=torch.float64)
        rgb_from_hed = rgb_from_hed / rgb_from_hed.norm(dim=1, keepdim=True)
        self.register_buffer("rgb_from_hed", rgb_from_hed.float(), persistent=False)
        self.register_buffer("hed_from_rgb", torch.linalg.inv(rgb_from_hed).float(),
                             persistent=False)

    @staticmethod
    def ranges(hparams: AugmentHParams) -> tuple[float, float]:
        """Half-widths of the scale and shift ranges."""
        return hparams.hed_scale, hparams.hed_shift

    def transform(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        density = -x.clamp_min(OD_EPSILON).log()
        stains = torch.einsum("bchw,cs->bshw", density, self.hed_from_rgb.to(x.device))
        alpha = uniform(1 - self.scale, 1 + self.scale, x, generator, channels=3)
        beta = uniform(-self.shift, self.shift, x, generator, channels=3)
        stains = stains * alpha[:, :, None, None] + beta[:, :, None, None]
        return torch.exp(-torch.einsum("bshw,sc->bchw", stains, self.rgb_from_hed.to(x.device)))


class HedStrongJitter(HedJitter):
    """:class:`HedJitter` with the "HED-strong" ranges of Tellez et al. 2019 ("Quantifying the
    effects of data augmentation and stain color normalization in convolutional neural networks
    for computational pathology"): alpha ~ U(0.8, 1.2), beta ~ U(-0.2, 0.2) by default."""

    @staticmethod
    def ranges(hparams: AugmentHParams) -> tuple[float, float]:
        return hparams.hed_strong_scale, hparams.hed_strong_shift


class HsvJitter(Augmentation):
    """Random hue shift and saturation / brightness (value) scaling per image."""

    def transform(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        hp = self.hparams
        hsv = rgb_to_hsv(x)
        hue = (hsv[:, 0:1] + per_image(uniform(-hp.hue, hp.hue, x, generator))) % 1
        saturation = hsv[:, 1:2] * per_image(
            uniform(1 - hp.saturation, 1 + hp.saturation, x, generator))
        value = hsv[:, 2:3] * per_image(uniform(1 - hp.brightness, 1 + hp.brightness, x, generator))
        return hsv_to_rgb(torch.cat((hue, saturation.clamp(0, 1), value.clamp(0, 1)), dim=1))


class Grayscale(Augmentation):
    """Replace an image by its luma in all three channels with probability ``grayscale_p``."""

    def __init__(self, hparams: AugmentHParams) -> None:
        super().__init__(hparams)
        self.register_buffer("luma_weights", channel_stats(LUMA_WEIGHTS), persistent=False)

    def transform(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        luma = (x * self.luma_weights.to(x.device)).sum(dim=1, keepdim=True).expand_as(x)
        return torch.where(chance(self.hparams.grayscale_p, x, generator), luma, x)


class Blur(Augmentation):
    """Gaussian blur with sigma ~ U(blur_sigma) per image, with probability ``blur_p``."""

    def transform(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        hp = self.hparams
        apply = chance(hp.blur_p, x, generator)
        sigma = uniform(*hp.blur_sigma, x, generator)
        radius = max(1, math.ceil(3 * hp.blur_sigma[1]))
        return torch.where(apply, gaussian_blur(x, sigma, radius), x)


class Downscale(Augmentation):
    """Resolution loss with probability ``downscale_p``: anti-aliased downsampling by a factor
    ~ U(downscale_factor) per image, then bilinear upsampling back to the input size."""

    def transform(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        hp = self.hparams
        height, width = x.shape[-2:]
        apply = chance(hp.downscale_p, x, generator)
        factor = uniform(*hp.downscale_factor, x, generator)
        radius = max(1, math.ceil(1.5 * (hp.downscale_factor[1] - 1)))
        smooth = gaussian_blur(x, (factor - 1) / 2, radius)
        rows, cols = pixel_centres(height, x), pixel_centres(width, x)
        low = sample_at(smooth, rows * factor[:, None], cols * factor[:, None])
        restored = sample_at(low, rows / factor[:, None], cols / factor[:, None])
        return torch.where(apply, restored, x)


class Noise(Augmentation):
    """Additive Gaussian noise with std ~ U(noise_std) per image, with probability ``noise_p``."""

    def transform(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        hp = self.hparams
        apply = chance(hp.noise_p, x, generator)
        std = per_image(uniform(*hp.noise_std, x, generator))
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return torch.where(apply, x + std * noise, x)


AUGMENTATIONS: dict[str, type[Augmentation]] = {
    "flip": Flip,
    "rot90": Rot90,
    "resized_crop": ResizedCrop,
    "hed_jitter": HedJitter,
    "hed_strong": HedStrongJitter,
    "hsv_jitter": HsvJitter,
    "grayscale": Grayscale,
    "blur": Blur,
    "downscale": Downscale,
    "noise": Noise,
}

_BASIC = ("flip", "rot90", "resized_crop")
_STAIN = (*_BASIC, "hed_jitter", "hsv_jitter", "grayscale")
_STAIN_STRONG = (*_BASIC, "hed_strong", "hsv_jitter", "grayscale")
_DEGRADE = ("blur", "downscale", "noise")
PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "basic": _BASIC,
    "stain": _STAIN,
    "domain": (*_STAIN, *_DEGRADE),
    "stain_strong": _STAIN_STRONG,
    "domain_strong": (*_STAIN_STRONG, *_DEGRADE),
}


def to_unit_float(batch_u8: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) to float32 (B, 3, H, W) in [0, 1], keeping channels-last strides."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(255)


def normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std per channel, as a channels-last float32 tensor."""
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def to_model_input(batch_u8: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Evaluation path: uint8 (B, H, W, 3) to normalised float32 (B, 3, H, W), channels last.

    Runs use ``common.model_input.ModelInput.normalise``: the backbone's own mean/std, on
    images stain-normalised when they were placed.
    """
    device = batch_u8.device
    return normalise(to_unit_float(batch_u8), channel_stats(mean, device),
                     channel_stats(std, device))


class Augmenter(nn.Module):
    """The named ops applied in order to a uint8 batch, then mean/std normalisation.

    Before the named ops: the random ``restainer`` (``common.stain.Restainer``). Stain
    normalisation is not an op here: it is applied once to the images when they are placed
    (``common.model_input.ModelInput.place``), for training and prediction alike; runs pass
    the backbone's mean/std (``ModelInput``). Constants (mean, std, stain matrices) are buffers
    that move to the batch's device on the first call, so later batches copy nothing from the
    host.
    """

    def __init__(self, names: Sequence[str], hparams: AugmentHParams | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 restainer: nn.Module | None = None) -> None:
        super().__init__()
        unknown = [name for name in names if name not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentation {unknown[0]!r}; known ops: "
                             f"{', '.join(AUGMENTATIONS)}; presets: {', '.join(PRESETS)}")
        self.hparams = hparams or AugmentHParams()
        self.names = tuple(names)
        self.ops = nn.ModuleList(AUGMENTATIONS[name](self.hparams) for name in self.names)
        self.stain_ops = nn.ModuleList(op for op in (restainer,) if op is not None)
        self.register_buffer("mean", channel_stats(mean), persistent=False)
        self.register_buffer("std", channel_stats(std), persistent=False)

    def forward(self, batch_u8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, H, W, 3) to augmented, normalised float32 (B, 3, H, W), channels last."""
        self.to(batch_u8.device)  # constants follow the batch; a no-op once they are there
        x = to_unit_float(batch_u8)
        for op in (*self.stain_ops, *self.ops):
            x = op(x, generator)
        return normalise(x, self.mean, self.std)


def build_augmenter(spec: str, hparams: AugmentHParams | None = None,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    restainer: nn.Module | None = None) -> Augmenter:
    """Augmenter from a preset name or a comma-separated list of op names."""
    names = PRESETS.get(spec)
    if names is None:
        names = tuple(name.strip() for name in spec.split(",") if name.strip())
    return Augmenter(names, hparams, mean, std, restainer=restainer)
