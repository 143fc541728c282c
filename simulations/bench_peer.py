"""The peer of ``cytofed bench --peer``: the input pipeline a researcher would usually write.

Every epoch, ``DataLoader`` workers open each image file with PIL, apply torchvision
transforms v2 of the ``domain`` preset's strength (:func:`peer_transform`) and hand batches
over in pinned memory (on CUDA); the main process copies each batch to the device and takes
the same training step as cytofed (:func:`common.train.train_step`: same model, loss,
optimiser, batch and device), so only the input pipeline differs. cytofed instead decodes every
file once into its image cache and augments uint8 batches already on the device.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2

from common.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentHParams
from common.centres import usable_records
from common.config import RunConfig
from common.data import CentreData, CentreSpec
from common.imagecache import load_images
from common.losses import create_loss
from common.pipeline import cache_dir, new_model
from common.train import TrainSettings, make_optimizer, prepare_model, resolve_device, train_step

# What the peer's augmentation lacks against the ``domain`` preset.
PEER_OMITS = ("HED stain jitter (no torchvision op); noise at one sigma (ours draws one per "
              "image)")
MAX_WORKERS = 8


class ImageFiles(Dataset):
    """Labelled image files, opened with PIL and transformed on every access."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: v2.Transform,
                 ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} image files but {len(labels)} labels")
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def peer_transform(image_size: int, hparams: AugmentHParams | None = None) -> v2.Compose:
    """The ``domain`` preset in torchvision v2 ops, at the same probabilities and ranges
    (:class:`common.augment.AugmentHParams`) as far as torchvision has the op (see
    ``PEER_OMITS``); the resized crop of the decoded file is also the resize."""
    hp = hparams or AugmentHParams()
    blur_kernel = 2 * math.ceil(3 * hp.blur_sigma[1]) + 1
    low, high = (round(image_size / factor) for factor in reversed(hp.downscale_factor))
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=hp.crop_scale, ratio=hp.crop_ratio,
                             antialias=True),
        v2.RandomHorizontalFlip(hp.flip_p),
        v2.RandomVerticalFlip(hp.flip_p),
        v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
        v2.ColorJitter(brightness=hp.brightness, saturation=hp.saturation, hue=hp.hue),
        v2.RandomGrayscale(hp.grayscale_p),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=hp.blur_sigma)], p=hp.blur_p),
        v2.RandomApply([v2.RandomResize(low, high + 1), v2.Resize((image_size, image_size))],
                       p=hp.downscale_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.GaussianNoise(sigma=sum(hp.noise_std) / 2)], p=hp.noise_p),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def centre_files(spec: CentreSpec, config: RunConfig) -> tuple[list[Path], list[int]]:
    """The image files cytofed loads for ``spec`` (readable ones, in load order) and labels."""
    kept, _ = usable_records(spec)
    paths = [record.path for record, _ in kept]
    loaded = load_images(paths, config.image_size, cache_dir(config), config.field_of_view,
                         label=f"the peer's files of {spec.name}")
    return [paths[i] for i in loaded.readable], [kept[i][1] for i in loaded.readable]


def write_image_files(data: CentreData, folder: Path) -> list[Path]:
    """``data``'s images as PNG files in ``folder`` (a peer for data that has no files)."""
    paths = [folder / f"{index:05d}.png" for index in range(len(data))]
    for path, image in zip(paths, data.images, strict=True):
        Image.fromarray(image).save(path)
    return paths


class PeerPipeline:
    """The usual PyTorch training loop on image files. :meth:`images_per_second` times one
    epoch of ``steps`` random batches; the workers persist between epochs (started once, as in
    a training run) until the pipeline is closed (``with PeerPipeline(...)``)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], config: RunConfig,
                 num_classes: int, class_counts: np.ndarray, workers: int, steps: int) -> None:
        self.device = resolve_device(config.device)
        self.model = prepare_model(new_model(config, num_classes), self.device)
        self.model.train()
        self.loss_fn = create_loss(config.loss, class_counts, progress=1.0).to(self.device)
        settings = TrainSettings(learning_rate=config.learning_rate,
                                 weight_decay=config.weight_decay)
        self.optimizer = make_optimizer(self.model, settings, self.device)
        dataset = ImageFiles(paths, labels, peer_transform(config.image_size))
        sampler = RandomSampler(dataset, replacement=True,
                                num_samples=steps * config.batch_size,
                                generator=torch.Generator().manual_seed(config.seed))
        self.loader: DataLoader | None = DataLoader(
            dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", drop_last=True,
            persistent_workers=workers > 0)
        self.workers = workers

    def __enter__(self) -> PeerPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.loader = None  # the last reference: its persistent workers are shut down

    def describe(self) -> dict[str, object]:
        """What the peer is, for the bench's output."""
        pinned = ", pinned memory" if self.device.type == "cuda" else ""
        return {"workers": self.workers,
                "pipeline": f"PIL decode, torchvision transforms v2 (domain strength; omits "
                            f"{PEER_OMITS}), DataLoader with {self.workers} workers{pinned}"}

    def images_per_second(self) -> float:
        """Images/s of one epoch: decoding, transforms and training steps."""
        if self.loader is None:
            raise RuntimeError("the peer pipeline is closed")
        started, seen = time.perf_counter(), 0
        for inputs, targets in self.loader:
            inputs = inputs.to(self.device, non_blocking=True).contiguous(
                memory_format=torch.channels_last)
            train_step(self.model, inputs, targets.to(self.device, non_blocking=True),
                       self.loss_fn, self.optimizer, self.device)
            seen += len(targets)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return seen / (time.perf_counter() - started)


def default_workers() -> int:
    """DataLoader workers when not given: one per CPU core, at most ``MAX_WORKERS``."""
    return min(os.cpu_count() or 1, MAX_WORKERS)


def peer_files(spec: CentreSpec | None, data: CentreData, config: RunConfig,
               scratch: Path) -> tuple[list[Path], list[int], str]:
    """The files the peer reads: the centre's own, or ``data`` written as PNG into
    ``scratch`` when the centre has none (a synthetic clinic); the third value says which."""
    if spec is None:
        paths = write_image_files(data, scratch)
        return paths, data.labels.tolist(), (f"the {len(paths)} synthetic images written as "
                                             f"{config.image_size} px PNG files")
    paths, labels = centre_files(spec, config)
    if len(paths) != len(data):
        raise ValueError(f"centre {spec.name!r}: the peer found {len(paths)} readable files, "
                         f"cytofed loaded {len(data)} images")
    return paths, labels, "the centre's original image files"
