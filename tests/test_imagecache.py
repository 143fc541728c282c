"""Decoding conversions, decoding limits and the content-addressed, memory-mapped image cache."""

from __future__ import annotations

import json
import multiprocessing
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import imagecache
from common.centres import load_centre
from common.data import CentreSpec
from common.imagecache import (
    CACHE_VERSION,
    MAX_PIXELS,
    ImageStore,
    ImageTooLarge,
    bounded_map,
    decode_image,
    load_images,
    probe_image,
    scale_to_uint8,
)

REPO = Path(__file__).resolve().parents[1]


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


def blank_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit black PNG of any size, written without ever holding its pixels."""
    compressor, body = zlib.compressobj(9), []
    row = bytes(1 + (width + 7) // 8)  # filter byte, then the packed bits
    for _ in range(height):
        body.append(compressor.compress(row))
    body.append(compressor.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b""))
    return path


def purple_nucleus(size: int = 64) -> np.ndarray:
    """A pale field with one purple nucleus in the middle (found by the cell finder)."""
    image = np.full((size, size, 3), (235, 215, 205), np.uint8)
    rows, cols = np.mgrid[:size, :size]
    image[(rows - size / 2) ** 2 + (cols - size / 2) ** 2 < (size / 6) ** 2] = (90, 50, 130)
    return image


def test_second_load_serves_every_file_from_the_cache(cell_files, tmp_path, monkeypatch):
    first = load_images(cell_files, 16, tmp_path / "cache")
    forbid_decoding(monkeypatch)
    second = load_images(cell_files, 16, tmp_path / "cache")

    assert [p.name for p in second.unreadable] == ["broken.jpg"]  # remembered, not retried
    assert second.errors == first.errors and "broken.jpg: " in second.errors[0]
    assert second.readable.tolist() == list(range(7)) == first.readable.tolist()
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(second.images[0], second.images[6])  # one entry, two names
    index = ImageStore(tmp_path / "cache", 16, "full").read_index()
    assert index.rows == 6 and len(index.entries) == 7
    assert second.cell_fallback is None and second.fallback_count == 0


def test_size_and_mode_have_separate_stores(cell_files, tmp_path):
    load_images(cell_files[:2], 16, tmp_path / "cache")
    load_images(cell_files[:2], 24, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "images").iterdir()) == [
        f"v{CACHE_VERSION}-full-16", f"v{CACHE_VERSION}-full-24"]
    with pytest.raises(ValueError, match="mode 'crop'"):
        load_images(cell_files, 16, tmp_path / "cache", mode="crop")


def test_rows_of_an_interrupted_writer_are_invisible_and_cut_off(tmp_path):
    store = ImageStore(tmp_path, 4, "full")
    store.add({"a": np.full((4, 4, 3), 1, np.uint8)})
    with (store.root / "pixels.u8").open("ab") as pixels:
        pixels.write(b"\x07" * 20)  # a crash in the middle of the next row

    assert store.read_index()[:2] == (1, {"a": 0})
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
    rows, entries, _, _ = store.read_index()
    assert rows == 40 and sorted(entries.values()) == list(range(40))
    assert (store.root / "pixels.u8").stat().st_size == 40 * store.row_bytes
    fresh = load_images(paths, 16, tmp_path / "fresh")
    cached = load_images(paths, 16, tmp_path / "cache")
    np.testing.assert_array_equal(fresh.images, cached.images)


def test_cell_mode_crops_the_original_resolution(tmp_path, write_wbc_image, monkeypatch):
    sizes = []

    def find_cell(image):
        sizes.append(image.size)
        return common_fov.CellBox(cy=80.0, cx=100.0, size=0.0, found=False, reason="test")

    import common.fov as common_fov

    monkeypatch.setattr(common_fov, "find_cell", find_cell)
    data = write_wbc_image(tmp_path / "big.jpg", size=(200, 160)).read_bytes()

    crop, found = decode_image(data, 32, "cell")
    assert crop.shape == (32, 32, 3) and not found
    assert sizes == [(200, 160)]


def test_cell_fallbacks_are_counted_remembered_and_reported_per_centre(tmp_path, monkeypatch):
    folder = tmp_path / "clinic" / "lymphocyte"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(purple_nucleus(64 + 8 * i)).save(folder / f"cell_{i}.png")
    Image.new("RGB", (64, 64), (240, 240, 240)).save(folder / "empty.png")
    paths = sorted(folder.iterdir())

    spec = CentreSpec("clinic", tmp_path / "clinic", format="auto")
    assert "cell_fallback" not in load_centre(spec, 32, tmp_path / "full").stats
    first = load_images(paths, 32, tmp_path / "cache", "cell")
    forbid_decoding(monkeypatch)
    second = load_images(paths, 32, tmp_path / "cache", "cell")

    assert [p.name for p in paths] == ["cell_0.png", "cell_1.png", "cell_2.png", "empty.png"]
    assert first.cell_fallback.tolist() == second.cell_fallback.tolist() == [
        False, False, False, True]
    assert load_centre(spec, 32, tmp_path / "cache", "cell").stats["cell_fallback"] == 1


def test_huge_images_are_refused_unread_with_their_size(tmp_path):
    """A 20,000 x 20,000 image (beyond Pillow's own limit) and a 9,000 x 9,000 one (below it,
    above ``MAX_PIXELS``) are listed unreadable with an error naming the file and its size; the
    loading process's peak resident memory (``VmHWM``, which unlike ``ru_maxrss`` does not
    carry over the parent's) stays far below the 81 MB to 1.2 GB that decoding them takes."""
    huge = blank_png(tmp_path / "huge.png", 20_000, 20_000)
    large = blank_png(tmp_path / "large.png", 9_000, 9_000)
    small = blank_png(tmp_path / "small.png", 40, 30)
    program = (
        "import json, re, sys\nfrom pathlib import Path\n"
        "from common.imagecache import load_images\n"
        "loaded = load_images([Path(p) for p in sys.argv[2:]], 16, Path(sys.argv[1]))\n"
        "peak = re.search(r'VmHWM:\\s*(\\d+) kB', Path('/proc/self/status').read_text())\n"
        "print(json.dumps({'unreadable': [p.name for p in loaded.unreadable],\n"
        "                  'errors': list(loaded.errors), 'readable': len(loaded.readable),\n"
        "                  'peak_mb': int(peak[1]) / 1024}))"
    )
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path / "cache"),
                             str(huge), str(large), str(small)], capture_output=True,
                            text=True, check=True, cwd=REPO)
    report = json.loads(result.stdout)

    assert report["unreadable"] == ["huge.png", "large.png"] and report["readable"] == 1
    huge_error, large_error = report["errors"]
    assert huge_error.startswith(f"{huge}: image of 400,000,000 pixels refused")
    assert large_error.startswith(f"{large}: image of 9000 x 9000 = 81,000,000 pixels refused")
    assert f"limit is {MAX_PIXELS:,} pixels" in large_error
    assert report["peak_mb"] < 200


def test_probe_refuses_images_over_the_pixel_limit(tmp_path):
    with pytest.raises(ImageTooLarge, match="9000 x 9000"):
        probe_image(blank_png(tmp_path / "large.png", 9_000, 9_000).read_bytes())
    assert probe_image(blank_png(tmp_path / "small.png", 40, 30).read_bytes()) == (40, 30)


def test_files_over_the_size_limit_are_not_read(tmp_path, monkeypatch, write_wbc_image):
    path = write_wbc_image(tmp_path / "a.png")
    monkeypatch.setattr(imagecache, "MAX_FILE_BYTES", 10)
    loaded = load_images([path], 16, tmp_path / "cache")
    assert loaded.errors == (f"{path}: cannot read: file of {path.stat().st_size:,} bytes "
                             "refused; the limit is 10 bytes",)


def test_wide_greyscale_is_scaled_by_range_not_clipped():
    assert scale_to_uint8(np.array([0, 257, 65535], np.uint16)).tolist() == [0, 1, 255]
    assert scale_to_uint8(np.array([0, 100, 255], np.int32)).tolist() == [0, 100, 255]
    assert scale_to_uint8(np.array([0.0, 0.5, 1.0], np.float32)).tolist() == [0, 128, 255]
    assert scale_to_uint8(np.array([0, 4095, 65535], np.int32)).tolist() == [0, 16, 255]
    assert scale_to_uint8(np.array([-5, 0, 2e6], np.float32)).tolist() == [0, 0, 255]
    every = np.arange(65536, dtype=np.uint16)
    expected = np.clip(np.rint(every * (255 / 65535)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(scale_to_uint8(every), expected)


@pytest.mark.parametrize(("dtype", "most"), [(np.uint16, 0.55), (np.int32, 1.3)])
def test_wide_greyscale_needs_no_float64_copy(dtype, most):
    """Peak extra memory of the conversion, relative to the input (a float64 copy: 4x or 2x)."""
    values = (np.arange(1000 * 1000) % 60000).astype(dtype).reshape(1000, 1000)
    tracemalloc.start()
    converted = scale_to_uint8(values)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert converted.dtype == np.uint8 and converted.shape == values.shape
    assert peak < most * values.nbytes


def test_sixteen_bit_png_decodes_by_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    image, found = decode_image((tmp_path / "ramp.png").read_bytes(), 64)
    assert found and image.dtype == np.uint8
    assert image[0, 0].tolist() == [0, 0, 0] and image[0, -1].tolist() == [255, 255, 255]


def test_bounded_map_keeps_order_and_few_calls_in_flight():
    started, lock = [], threading.Lock()

    def work(item: int) -> int:
        with lock:
            started.append(item)
        time.sleep(0.001)
        return item * 2

    results = []
    with ThreadPoolExecutor(4) as pool:
        for result in bounded_map(work, range(50), pool, in_flight=3):
            results.append(result)
            time.sleep(0.002)  # a slow consumer
            assert len(started) <= len(results) + 3
    assert results == [2 * i for i in range(50)]


def test_long_loads_show_one_bar_of_a_few_lines_in_a_log(tmp_path, write_wbc_image,
                                                          monkeypatch, capsys):
    paths = [write_wbc_image(tmp_path / f"{i}.png", seed=i) for i in range(60)]
    monkeypatch.setattr(imagecache, "PROGRESS_MIN_FILES", 50)
    load_images(paths, 16, tmp_path / "cache", label="loading clinic")
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 12 and all(line.startswith("loading clinic [") for line in lines)
    assert lines[-1].startswith("loading clinic [60/60, 100%")
    load_images(paths[:49], 16, tmp_path / "other")
    assert capsys.readouterr().err == ""
