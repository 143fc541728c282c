"""Local training and evaluation loops on device-resident uint8 images (no DataLoader, no PIL)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from common.augment import Augmenter
from common.calibration import apply_temperature, log_softmax
from common.metrics import classification_metrics
from common.sampling import balanced_batches

if TYPE_CHECKING:
    from common.model_input import ModelInput

# Fraction of free accelerator memory the uint8 image tensor may take before it is streamed.
DEVICE_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one local training call: ``epochs`` passes over the images in a
    random order, or exactly ``steps`` optimiser steps when ``steps > 0``; ``sampling_balance``
    > 0 draws batches with replacement, mixing instance- and class-balanced sampling
    (``common.sampling``)."""

    epochs: int = 1
    steps: int = 0
    sampling_balance: float = 0.0
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    proximal_mu: float = 0.0
    seed: int = 0
    compile: bool = False


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def images_on_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images on ``device`` when they fit, else in pinned host memory (streamed per batch).

    On the CPU the tensor shares ``images``' memory. Runs place images through
    ``common.model_input.ModelInput.place``, which stain-normalises them too.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if device.type != "cuda":
        return tensor
    free, _ = torch.cuda.mem_get_info(device)
    if tensor.numel() < DEVICE_MEMORY_SHARE * free:
        return tensor.to(device)
    return tensor.pin_memory()


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device, compile_model: bool = False) -> nn.Module:
    """Move to ``device`` in channels_last layout; optionally ``torch.compile`` it."""
    model = model.to(device=device, memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model


def make_optimizer(model: nn.Module, settings: TrainSettings,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the fused kernel on CUDA)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                             lr=settings.learning_rate, weight_decay=settings.weight_decay,
                             fused=True if device.type == "cuda" else None)


def train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, device: torch.device,
               penalty: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """One optimiser step (bf16 autocast on CUDA); the loss, detached, stays on the device."""
    with _autocast(device):
        loss = loss_fn(model(inputs).float(), targets)
    if penalty is not None:
        loss = loss + penalty()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def gather_batch(images: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``index`` of ``images`` on ``device``: from pinned host memory through a pinned
    staging buffer and an asynchronous copy, so the host never waits for the device."""
    if images.is_pinned():
        staged = torch.empty((len(index), *images.shape[1:]), dtype=images.dtype,
                             pin_memory=True)
        return torch.index_select(images, 0, index, out=staged).to(device, non_blocking=True)
    return images[index].to(device, non_blocking=True)


def batch_schedule(labels: torch.Tensor, settings: TrainSettings,
                   generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Image indices (steps, batch size) of each pass of a local fit, drawn with ``generator``
    on ``labels``' device: ``settings.steps`` batches in one pass, or ``settings.epochs``
    passes of ``N // batch size`` batches (each a shuffled epoch, the ragged last batch
    dropped: a batch of one breaks BatchNorm and skews the loss). With a sampling balance, or
    a fixed number of steps, batches are drawn with replacement (``common.sampling``)."""
    n = len(labels)
    batch_size = min(settings.batch_size, n)
    if settings.steps:
        yield balanced_batches(labels, settings.steps, batch_size, generator,
                               settings.sampling_balance)
        return
    for _ in range(settings.epochs):
        if settings.sampling_balance:
            yield balanced_batches(labels, n // batch_size, batch_size, generator,
                                   settings.sampling_balance)
        else:
            order = torch.randperm(n, generator=generator)
            yield order[:n // batch_size * batch_size].view(-1, batch_size)


def train_local(model: nn.Module, images: torch.Tensor, labels: np.ndarray, loss_fn: nn.Module,
                settings: TrainSettings, augmenter: Augmenter, device: torch.device,
                on_epoch: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """Train ``model`` in place for the passes of :func:`batch_schedule`; returns mean loss,
    throughput and the optimiser steps taken.

    ``images`` are placed (``common.model_input.ModelInput.place``). With ``proximal_mu > 0``
    the FedProx term ``mu/2 * ||w - w_start||^2`` keeps the weights near those the call
    started from. The host waits for the device once per pass (the loss), never per step;
    ``on_epoch(pass, loss)``.
    """
    model.train()
    network = prepare_model(model, device, settings.compile)
    loss_fn = loss_fn.to(device)
    targets = torch.as_tensor(labels, dtype=torch.int64).to(device)
    optimizer = make_optimizer(model, settings, device)
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu else []

    def proximal_term() -> torch.Tensor:
        return settings.proximal_mu / 2 * sum(
            (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True))

    generator = torch.Generator(device=device).manual_seed(settings.seed)
    order_generator = torch.Generator().manual_seed(settings.seed)
    total_loss, seen, steps, started = 0.0, 0, 0, time.perf_counter()
    schedule = batch_schedule(torch.as_tensor(labels, dtype=torch.int64), settings,
                              order_generator)
    for epoch, batches in enumerate(schedule):
        epoch_loss = torch.zeros((), device=device)
        # The pass's indices are copied to the device once, not one index tensor per step.
        image_batches, target_batches = batches.to(images.device), batches.to(device)
        for image_index, target_index in zip(image_batches, target_batches, strict=True):
            batch = gather_batch(images, image_index, device)
            loss = train_step(network, augmenter(batch, generator), targets[target_index],
                              loss_fn, optimizer, device, proximal_term if anchor else None)
            epoch_loss += loss * len(target_index)
        total_loss += float(epoch_loss)
        seen += batches.numel()
        steps += len(batches)
        if on_epoch:
            on_epoch(epoch, float(epoch_loss) / max(batches.numel(), 1))
    elapsed = time.perf_counter() - started
    return {"train_loss": total_loss / max(seen, 1), "images_per_second": seen / elapsed,
            "train_seconds": elapsed, "local_steps": steps}


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device,
                   inputs: ModelInput, batch_size: int = 256) -> np.ndarray:
    """Logits (N, C) of ``model`` in eval mode on placed uint8 images (N, H, W, 3) (see
    ``common.model_input``)."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        with _autocast(device):
            logits = model(inputs.normalise(batch))
        outputs.append(logits.float().cpu())
    if not outputs:
        raise ValueError("cannot predict on an empty image set")
    return torch.cat(outputs).numpy()


def predict_probabilities(model: nn.Module, images: torch.Tensor, device: torch.device,
                          inputs: ModelInput, temperature: float = 1.0,
                          batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities (N, C) of ``model``'s logits divided by ``temperature``."""
    return apply_temperature(predict_logits(model, images, device, inputs, batch_size),
                             temperature)


def logit_metrics(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                  temperature: float = 1.0) -> dict:
    """:func:`common.metrics.classification_metrics` of ``softmax(logits / temperature)``,
    plus the mean negative log-likelihood (``loss``)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_probabilities = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    metrics = classification_metrics(labels, np.exp(log_probabilities), classes)
    picked = log_probabilities[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
    metrics["loss"] = float(-np.mean(picked))
    return metrics


def evaluate_model(model: nn.Module, images: torch.Tensor, labels: np.ndarray,
                   classes: Sequence[str], device: torch.device, inputs: ModelInput,
                   temperature: float = 1.0, batch_size: int = 256) -> dict:
    """:func:`logit_metrics` of ``model`` on labelled placed images."""
    return logit_metrics(predict_logits(model, images, device, inputs, batch_size), labels,
                         classes, temperature)


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor],
                    device: torch.device, inputs: ModelInput,
                    batch_size: int = 64) -> nn.Module:
    """Test-time BatchNorm adaptation: re-estimate running statistics on unlabelled placed
    images (one tensor, or an iterable of tensors for a set too large to hold at once)."""
    from common.models import is_batchnorm

    norms = [m for m in model.modules() if is_batchnorm(m)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all batches
    model.train()
    for chunk in [images] if isinstance(images, torch.Tensor) else images:
        for start in range(0, len(chunk), batch_size):
            model(inputs.normalise(chunk[start:start + batch_size].to(device,
                                                                     non_blocking=True)))
    model.eval()
    return model
