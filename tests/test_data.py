"""Splits are stratified, seeded and never separate a group."""

import numpy as np
import pytest

from common.data import CentreData, split_indices


def test_splits_partition_and_are_seeded():
    labels = np.repeat(np.arange(4), 50)
    groups = np.arange(200)
    first = split_indices(labels, groups, seed=1)
    again = split_indices(labels, groups, seed=1)
    other = split_indices(labels, groups, seed=2)
    assert sorted(np.concatenate(list(first.values()))) == list(range(200))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["test"], other["test"])
    for split in ("val", "test"):  # stratified: every class in every split
        assert set(labels[first[split]]) == {0, 1, 2, 3}
    assert len(first["test"]) == pytest.approx(30, abs=4)


def test_groups_stay_together_and_rare_classes_train():
    labels = np.array([0] * 20 + [1] * 2 + [2])
    groups = np.array([i // 2 for i in range(20)] + [100, 101, 102])
    splits = split_indices(labels, groups, seed=0)
    split_of = {i: name for name, idx in splits.items() for i in idx}
    for g in np.unique(groups):
        assert len({split_of[i] for i in np.flatnonzero(groups == g)}) == 1
    assert split_of[22] == "train"  # a class with a single image trains
    assert {split_of[20], split_of[21]} == {"train", "val"}


def test_centre_data_checks_shapes():
    with pytest.raises(ValueError, match="uint8"):
        CentreData("x", ("a",), np.zeros((2, 8, 8, 3), np.float32), np.zeros(2, np.int64),
                   np.zeros(2, np.int64))
    data = CentreData("x", ("a", "b"), np.zeros((3, 8, 8, 3), np.uint8),
                      np.array([0, 1, 1]), np.arange(3))
    assert data.class_counts().tolist() == [1, 2]
    assert len(data.subset(np.array([0, 2]))) == 2
