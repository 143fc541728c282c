"""Decoding conversions and the content-addressed, memory-mapped image cache."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

import common.fov
from common import imagecache
from common.imagecache import ImageStore, decode_image, load_images, scale_to_uint8


def forbid_decoding(monkeypatch):
    def decode(*args, **kwargs):
        raise AssertionError("decoded although the cache holds the image")

    monkeypatch.setattr(imagecache, "decode_image", decode)


@pytest.fixture
def cell_files(tmp_path, write_wbc_image):
    paths = [write_wbc_image(tmp_path / "cells" / f"{i}.jpg", seed=i) for i in range(6)]
    (tmp_path / "cells" / "same_as_0.jpg").write_bytes(paths[0].read_bytes())
    (tmp_path / "cells" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return [*paths, tmp_path / "cells" / "same_as_0.jpg", tmp_path / "cells" / "broken.jpg"]


def test_second_load_serves_every_file_from_the_cache(cell_files, tmp_path, monkeypatch):
    first = load_images(cell_files, 16, tmp_path / "cache")
    forbid_decoding(monkeypatch)
    second = load_images(cell_files, 16, tmp_path / "cache")

    assert [p.name for p in second.unreadable] == ["broken.jpg"]  # remembered, not retried
    assert second.readable.tolist() == list(range(7)) == first.readable.tolist()
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(second.images[0], second.images[6])  # one entry, two names
    rows, entries = ImageStore(tmp_path / "cache", 16, "full").read_index()
    assert rows == 6 and len(entries) == 7


def test_size_and_mode_have_separate_stores(cell_files, tmp_path):
    load_images(cell_files[:2], 16, tmp_path / "cache")
    load_images(cell_files[:2], 24, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "images").iterdir()) == [
        "v1-full-16", "v1-full-24"]
    with pytest.raises(ValueError, match="mode 'crop'"):
        load_images(cell_files, 16, tmp_path / "cache", mode="crop")


def test_rows_of_an_interrupted_writer_are_invisible_and_cut_off(tmp_path):
    store = ImageStore(tmp_path, 4, "full")
    store.add({"a": np.full((4, 4, 3), 1, np.uint8)})
    with (store.root / "pixels.u8").open("ab") as pixels:
        pixels.write(b"\x07" * 20)  # a crash in the middle of the next row

    assert store.read_index() == (1, {"a": 0})
    store.add({"b": np.full((4, 4, 3), 2, np.uint8)})

    assert (store.root / "pixels.u8").stat().st_size == 2 * store.row_bytes
    assert store.rows([1, 0])[:, 0, 0, 0].tolist() == [2, 1]


def test_two_processes_filling_one_cache_share_one_consistent_store(tmp_path, write_wbc_image):
    paths = [write_wbc_image(tmp_path / "cells" / f"{i}.png", seed=i) for i in range(40)]
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=load_images, args=(paths, 16, tmp_path / "cache"))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]

    store = ImageStore(tmp_path / "cache", 16, "full")
    rows, entries = store.read_index()
    assert rows == 40 and sorted(entries.values()) == list(range(40))
    assert (store.root / "pixels.u8").stat().st_size == 40 * store.row_bytes
    fresh = load_images(paths, 16, tmp_path / "fresh")
    cached = load_images(paths, 16, tmp_path / "cache")
    np.testing.assert_array_equal(fresh.images, cached.images)


def test_cell_mode_crops_the_original_resolution(tmp_path, write_wbc_image, monkeypatch):
    shapes = []

    def crop_to_cell(image, out_size, context=2.2):
        shapes.append(image.shape)
        return np.zeros((out_size, out_size, 3), np.uint8)

    monkeypatch.setattr(common.fov, "crop_to_cell", crop_to_cell)
    data = write_wbc_image(tmp_path / "big.jpg", size=(200, 160)).read_bytes()

    assert decode_image(data, 32, "cell").shape == (32, 32, 3)
    assert shapes == [(160, 200, 3)]


def test_wide_greyscale_is_scaled_by_range_not_clipped():
    assert scale_to_uint8(np.array([0, 257, 65535], np.uint16)).tolist() == [0, 1, 255]
    assert scale_to_uint8(np.array([0, 100, 255], np.int32)).tolist() == [0, 100, 255]
    assert scale_to_uint8(np.array([0.0, 0.5, 1.0], np.float32)).tolist() == [0, 128, 255]
    assert scale_to_uint8(np.array([0, 4095, 65535], np.int32)).tolist() == [0, 16, 255]
    assert scale_to_uint8(np.array([-5, 0, 2e6], np.float32)).tolist() == [0, 0, 255]
