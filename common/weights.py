"""Model weights as named numpy arrays: extraction, loading, wire precision, safetensors files."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from torch import nn

WIRE_PRECISIONS = ("fp32", "bf16", "fp16")
# BatchNorm's step counters are bookkeeping, not weights: they are neither sent nor averaged.
COUNTER_SUFFIX = "num_batches_tracked"


def model_state(model: nn.Module, exclude: Collection[str] = ()) -> dict[str, np.ndarray]:
    """The model's weights as CPU numpy arrays, without step counters and keys in ``exclude``."""
    return {key: tensor.detach().cpu().numpy().copy()
            for key, tensor in model.state_dict().items()
            if key not in exclude and not key.endswith(COUNTER_SUFFIX)}


def load_state(model: nn.Module, state: dict[str, np.ndarray],
               allow_missing: Collection[str] = ()) -> None:
    """Load named arrays into ``model``; unknown keys, wrong shapes or missing keys are errors.

    Step counters and keys in ``allow_missing`` (for example FedBN's local BatchNorm tensors)
    may be absent and keep their current values.
    """
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) - set(allow_missing)
                     if not k.endswith(COUNTER_SUFFIX))
    if unknown or missing:
        raise ValueError(f"weights do not match the model: unknown keys {unknown[:5]}, "
                         f"missing keys {missing[:5]}")
    for key, array in state.items():
        if tuple(array.shape) != tuple(own[key].shape):
            raise ValueError(f"weights for {key} have shape {tuple(array.shape)}, "
                             f"the model expects {tuple(own[key].shape)}")
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                          strict=False)


def to_wire(state: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    """Floating-point arrays cast for transfer: fp32 as is, fp16, or bf16 (as its uint16 bits)."""
    if precision not in WIRE_PRECISIONS:
        raise ValueError(f"unknown wire precision {precision!r}; expected {WIRE_PRECISIONS}")
    if precision == "fp32":
        return state
    return {key: _encode_half(array, precision) if array.dtype == np.float32 else array
            for key, array in state.items()}


def from_wire(state: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_wire`: every floating-point array back to float32."""
    if precision == "fp32":
        return state
    return {key: _decode_half(array, precision) if _is_half(array, precision) else array
            for key, array in state.items()}


def _encode_half(array: np.ndarray, precision: str) -> np.ndarray:
    if precision == "fp16":
        return array.astype(np.float16)
    return torch.from_numpy(array).to(torch.bfloat16).view(torch.uint16).numpy()


def _is_half(array: np.ndarray, precision: str) -> bool:
    return array.dtype == (np.float16 if precision == "fp16" else np.uint16)


def _decode_half(array: np.ndarray, precision: str) -> np.ndarray:
    if precision == "fp16":
        return array.astype(np.float32)
    return torch.from_numpy(array).view(torch.bfloat16).to(torch.float32).numpy()


def save_weights(path: Path, state: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write ``state`` as safetensors; ``metadata`` is stored as JSON in the file header."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    save_file({k: np.require(v, requirements="C") for k, v in state.items()}, str(path),
              metadata={"cytofed": json.dumps(metadata or {})})
    return path


def load_weights(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read a safetensors file written by :func:`save_weights`: arrays and metadata."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    with safe_open(str(path), framework="numpy") as handle:
        metadata = json.loads((handle.metadata() or {}).get("cytofed", "{}"))
    return load_file(str(path)), metadata
