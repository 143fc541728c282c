"""Shared fixtures.

Real-data layer (``common.sources``, ``centres``, ``imagecache``, ``inspect``): small, really
encoded cell-like images and a generic class-per-folder layout written into ``tmp_path``.
Flower messages: ``server_task`` creates them as a ServerApp task would.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def wbc_pixels(seed: int, size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """Uint8 (height, width, 3): a pale background with a dark disc, different per seed."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(size) / 3) ** 2
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = rng.integers(180, 250, 3)
    pixels[disc] = rng.integers(30, 120, 3)
    return pixels


@pytest.fixture
def write_wbc_image() -> Callable[..., Path]:
    """``write(path, seed=0, size=(40, 32), mode="RGB")``: encode a cell image by suffix."""

    def write(path: Path, seed: int = 0, size: tuple[int, int] = (40, 32),
              mode: str = "RGB") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(wbc_pixels(seed, size)).convert(mode).save(path)
        return path

    return write


@pytest.fixture
def wbc_class_folders(tmp_path: Path, write_wbc_image: Callable[..., Path]) -> Path:
    """Generic layout: 4 images in each wbc5 class folder (one eosinophil also saved under a
    second name, byte-identical), 2 platelets and a corrupt ``.jpg`` among the neutrophils."""
    root = tmp_path / "wbc_folders"
    classes = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "platelet")
    for c, name in enumerate(classes):
        for i in range(2 if name == "platelet" else 4):
            write_wbc_image(root / name / f"{name}_{i}.jpg", seed=10 * c + i)
    duplicate = root / "eosinophil" / "eosinophil_0.jpg"
    (root / "eosinophil" / "copy_of_eosinophil_0.jpg").write_bytes(duplicate.read_bytes())
    (root / "neutrophil" / "broken.jpg").write_bytes(b"not an image at all")
    return root


@pytest.fixture
def tiny_centre(tmp_path: Path, wbc_class_folders: Path, monkeypatch) -> list[str]:
    """``cytofed bench`` arguments reading the decoded images of ``wbc_class_folders`` as one
    centre, through a decoded-image cache in ``tmp_path``."""
    monkeypatch.setenv("CYTOFED_CACHE_DIR", str(tmp_path / "cache"))
    toml = tmp_path / "centre.toml"
    toml.write_text(f'name = "tiny"\npath = "{wbc_class_folders}"\n')
    return ["--data-source", str(toml), "--centre", "tiny"]


@pytest.fixture
def server_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are created as by a ServerApp task of run 1."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
