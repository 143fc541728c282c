"""Batched on-device augmentation: shapes, ranges, determinism and what each op must preserve."""

from __future__ import annotations

import pytest
import torch

from common.augment import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    Augmenter,
    AugmentHParams,
    build_augmenter,
    hsv_to_rgb,
    rgb_to_hsv,
    to_model_input,
)

BATCH, SIZE = 6, 32
ALWAYS = AugmentHParams(grayscale_p=1.0, blur_p=1.0, downscale_p=1.0, noise_p=1.0)
SOMETIMES = AugmentHParams(grayscale_p=0.5, blur_p=0.5, downscale_p=0.5, noise_p=0.5)


def seeded(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def smooth_images(device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """Float (B, 3, S, S) images in [0, 1] with smooth structure and distinct pixel values."""
    generator = seeded(seed)
    coarse = torch.rand(BATCH, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic")
    return images.clamp(0, 1).to(device)


def uint8_batch(device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """uint8 (B, S, S, 3) batch as the trainer holds it."""
    return (smooth_images(device, seed) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def op(name: str, hparams: AugmentHParams = ALWAYS) -> torch.nn.Module:
    return AUGMENTATIONS[name](hparams)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_op_keeps_shape_dtype_device_and_range(name: str) -> None:
    images = smooth_images()
    out = op(name)(images, seeded(0))
    assert out.shape == images.shape
    assert out.dtype == torch.float32
    assert out.device == images.device
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_op_is_reproducible_and_seed_dependent(name: str) -> None:
    images = smooth_images()
    first = op(name, SOMETIMES)(images, seeded(1))
    assert torch.equal(first, op(name, SOMETIMES)(images, seeded(1)))
    assert not torch.equal(first, op(name, SOMETIMES)(images, seeded(2)))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_output_format(preset: str) -> None:
    batch = uint8_batch()
    out = build_augmenter(preset, ALWAYS)(batch, seeded(0))
    assert out.shape == (BATCH, 3, SIZE, SIZE)
    assert out.dtype == torch.float32
    assert out.device == batch.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    unnormalised = out * std + mean
    assert unnormalised.min() >= -1e-5 and unnormalised.max() <= 1 + 1e-5


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"none"}))
def test_preset_is_reproducible_and_seed_dependent(preset: str) -> None:
    batch = uint8_batch()
    augmenter = build_augmenter(preset)
    first = augmenter(batch, seeded(3))
    assert torch.equal(first, augmenter(batch, seeded(3)))
    assert not torch.equal(first, augmenter(batch, seeded(4)))


def test_presets_nest() -> None:
    assert PRESETS["none"] == ()
    assert PRESETS["basic"] == ("flip", "rot90", "resized_crop")
    assert PRESETS["stain"] == (*PRESETS["basic"], "hed_jitter", "hsv_jitter", "grayscale")
    assert PRESETS["domain"] == (*PRESETS["stain"], "blur", "downscale", "noise")
    assert PRESETS["stain_strong"] == (*PRESETS["basic"], "hed_strong", "hsv_jitter",
                                       "grayscale")
    assert PRESETS["domain_strong"] == (*PRESETS["stain_strong"], "blur", "downscale", "noise")


@pytest.mark.parametrize("name", ["flip", "rot90"])
def test_flip_and_rot90_permute_pixels(name: str) -> None:
    images = smooth_images()
    out = op(name)(images, seeded(0))
    for before, after in zip(images, out, strict=True):
        assert torch.equal(before.flatten().sort().values, after.flatten().sort().values)
    assert not torch.equal(out, images)


def test_grayscale_with_certainty_equalises_channels() -> None:
    out = op("grayscale", AugmentHParams(grayscale_p=1.0))(smooth_images(), seeded(0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_hed_jitter_with_zero_ranges_is_identity() -> None:
    images = smooth_images()
    out = op("hed_jitter", AugmentHParams(hed_scale=0.0, hed_shift=0.0))(images, seeded(0))
    assert torch.allclose(out, images, atol=1e-4)


def test_hed_jitter_changes_colour() -> None:
    images = smooth_images()
    out = op("hed_jitter", AugmentHParams(hed_scale=0.3, hed_shift=0.2))(images, seeded(0))
    assert (out - images).abs().mean() > 0.01


def test_hed_strong_draws_the_ranges_of_tellez_2019() -> None:
    defaults = AugmentHParams()
    assert (defaults.hed_strong_scale, defaults.hed_strong_shift) == (0.2, 0.2)
    jitter = op("hed_strong")
    # Two pixels given in HED space, far enough from white that no output is clamped.
    stains = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.9, 0.8]])
    pixels = torch.exp(-stains @ jitter.rgb_from_hed)  # (2 pixels, RGB)
    images = pixels.T.reshape(1, 3, 1, 2).expand(400, 3, 1, 2).contiguous()
    out = jitter(images, seeded(0))
    after = -out.log().permute(0, 2, 3, 1).reshape(400, 2, 3) @ jitter.hed_from_rgb
    alpha = (after[:, 1] - after[:, 0]) / (stains[1] - stains[0])
    beta = after[:, 0] - alpha * stains[0]
    for values, (low, high) in ((alpha, (0.8, 1.2)), (beta, (-0.2, 0.2))):
        assert values.min() >= low - 1e-3 and values.max() <= high + 1e-3
        assert values.min() < low + 0.02 and values.max() > high - 0.02


def test_hsv_round_trip_and_zero_jitter_is_identity() -> None:
    images = smooth_images()
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(images)), images, atol=1e-5)
    still = AugmentHParams(hue=0.0, saturation=0.0, brightness=0.0)
    assert torch.allclose(op("hsv_jitter", still)(images, seeded(0)), images, atol=1e-5)


def test_noise_with_zero_std_is_identity() -> None:
    images = smooth_images()
    silent = AugmentHParams(noise_p=1.0, noise_std=(0.0, 0.0))
    assert torch.equal(op("noise", silent)(images, seeded(0)), images)


def test_ops_with_zero_probability_are_identity() -> None:
    images = smooth_images()
    never = AugmentHParams(flip_p=0.0, grayscale_p=0.0, blur_p=0.0, downscale_p=0.0, noise_p=0.0)
    for name in ("flip", "grayscale", "blur", "downscale", "noise"):
        assert torch.equal(op(name, never)(images, seeded(0)), images), name


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between horizontally and vertically adjacent pixels."""
    return (images.diff(dim=-1) ** 2).mean() + (images.diff(dim=-2) ** 2).mean()


@pytest.mark.parametrize("name", ["blur", "downscale"])
def test_blur_and_downscale_remove_high_frequencies(name: str) -> None:
    noisy = torch.rand(BATCH, 3, SIZE, SIZE, generator=seeded(5))
    out = op(name)(noisy, seeded(0))
    assert high_frequency_energy(out) < 0.5 * high_frequency_energy(noisy)


def test_resized_crop_with_full_scale_is_identity() -> None:
    images = smooth_images()
    full = AugmentHParams(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    assert torch.allclose(op("resized_crop", full)(images, seeded(0)), images, atol=1e-5)


def test_to_model_input_matches_hand_normalisation() -> None:
    batch = uint8_batch()
    out = to_model_input(batch)
    pixel = batch[2, 5, 7].float() / 255
    expected = (pixel - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[2, :, 5, 7], expected, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(Augmenter([])(batch), out)


def test_custom_mean_and_std() -> None:
    batch = uint8_batch()
    out = Augmenter([], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(batch)
    assert torch.allclose(out, to_model_input(batch, (0.5,) * 3, (0.5,) * 3))
    assert out.min() >= -1 and out.max() <= 1


def test_comma_separated_spec() -> None:
    assert build_augmenter(" flip, noise ").names == ("flip", "noise")


def test_unknown_op_is_named_with_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'sharpen'.*flip, rot90"):
        build_augmenter("flip,sharpen")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cpu_and_cuda_agree_in_distribution(preset: str) -> None:
    augmenter = build_augmenter(preset, ALWAYS)
    cpu = augmenter(uint8_batch("cpu"), seeded(0, "cpu"))
    cuda = augmenter(uint8_batch("cuda"), seeded(0, "cuda"))
    assert cuda.device.type == "cuda"
    assert cpu.shape == cuda.shape and cpu.dtype == cuda.dtype == torch.float32
    assert torch.isfinite(cuda).all()
    assert abs(cpu.mean().item() - cuda.mean().item()) < 0.3
    assert abs(cpu.std().item() - cuda.std().item()) < 0.3


# Every op made deterministic: probabilities 0 or 1 and zero-width ranges (rot90 aside, whose
# only randomness is the turn), so CPU and CUDA must compute the same images.
FIXED = AugmentHParams(flip_p=1.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                       hed_scale=0.0, hed_shift=0.0, hed_strong_scale=0.0,
                       hed_strong_shift=0.0, hue=0.0, saturation=0.0, brightness=0.0,
                       grayscale_p=1.0, blur_p=1.0, blur_sigma=(1.0, 1.0), downscale_p=1.0,
                       downscale_factor=(2.0, 2.0), noise_p=1.0, noise_std=(0.0, 0.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(set(AUGMENTATIONS) - {"rot90"}))
def test_cpu_and_cuda_compute_the_same_deterministic_op(name: str) -> None:
    images = smooth_images()
    cpu = op(name, FIXED)(images, seeded(0))
    cuda = op(name, FIXED).to("cuda")(images.to("cuda"), seeded(0, "cuda"))
    assert cuda.device.type == "cuda"
    # TF32 convolutions (blur) on the GPU round to about 1e-3.
    assert torch.allclose(cpu, cuda.cpu(), atol=2e-3), (cpu - cuda.cpu()).abs().max()
