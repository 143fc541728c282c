"""Centre descriptions, in-memory centre data and seeded, stratified, grouped splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CentreSpec:
    """One site's data as described by its centre TOML (or by the synthetic defaults)."""

    name: str
    path: Path | None = None
    format: str = "auto"
    taxonomy: str = "wbc5"
    split_seed: int = 0
    share_counts: bool = True
    share_stain: bool = False  # may the site share its stain statistics (stain-sharing)
    class_map: tuple[tuple[str, str], ...] = ()  # [classes]: source class -> class or "drop"


@dataclass
class CentreData:
    """Decoded images of one centre at training resolution.

    ``images`` is uint8 (N, S, S, 3); ``labels`` indexes ``classes``; images sharing a
    ``groups`` id (same patient, byte-identical duplicates) always land in the same split.
    ``stats`` holds aggregate load counts (skipped files, dropped classes), never file names.
    """

    name: str
    classes: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"centre {self.name!r}: images must be uint8 (N, S, S, 3), got "
                             f"{self.images.dtype} {self.images.shape}")
        if len(self.images) != n or len(self.groups) != n:
            raise ValueError(f"centre {self.name!r}: {len(self.images)} images, {n} labels, "
                             f"{len(self.groups)} groups")

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Images per class (over ``indices`` if given), in ``classes`` order."""
        labels = self.labels if indices is None else self.labels[indices]
        return np.bincount(labels, minlength=len(self.classes))

    def subset(self, indices: np.ndarray) -> CentreData:
        """The same centre restricted to ``indices``."""
        return CentreData(self.name, self.classes, self.images[indices], self.labels[indices],
                          self.groups[indices], dict(self.stats))


def split_indices(labels: np.ndarray, groups: np.ndarray, seed: int,
                  val_fraction: float = 0.15, test_fraction: float = 0.15) -> dict[str, np.ndarray]:
    """Stratified train/val/test indices that never separate a group.

    Each group takes the most frequent label of its members; the groups of every class are
    shuffled with ``seed`` and dealt to test, val and train. A class with at least three groups
    gets at least one group in each split; with two, one goes to train and one to val.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    unique_groups, group_of = np.unique(groups, return_inverse=True)
    group_label = np.array([np.bincount(labels[group_of == g]).argmax()
                            for g in range(len(unique_groups))], dtype=np.int64)
    rng = np.random.default_rng(seed)
    split_of_group = np.zeros(len(unique_groups), dtype=np.int64)  # 0 train, 1 val, 2 test
    for cls in np.unique(group_label):
        members = rng.permutation(np.flatnonzero(group_label == cls))
        n = len(members)
        n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
        n_val = max(1, round(n * val_fraction)) if n >= 2 else 0
        split_of_group[members[:n_test]] = 2
        split_of_group[members[n_test:n_test + n_val]] = 1
    per_image = split_of_group[group_of]
    return {name: np.flatnonzero(per_image == i) for i, name in enumerate(SPLITS)}
