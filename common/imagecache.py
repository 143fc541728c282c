"""Decoding to square RGB uint8 and a content-addressed, memory-mapped on-disk image cache.

Preprocessing (``mode``):

* ``full``: the whole image, padded to a square with the median colour of its border (the
  slide background, so no cell is squashed and no black frame is learnt), then resized with
  Lanczos antialiasing. JPEGs are first decoded at the smallest DCT scale that still exceeds
  the target size, which is faster and itself antialiased.
* ``cell``: ``common.fov.crop_to_cell`` on the original decoded image, a cell-centred view.

Every image is first made 8-bit RGB: transparency is composited on white, palette, greyscale,
CMYK and YCbCr are converted, and 16-bit (or wider) greyscale is scaled by its range, never
clipped (see ``scale_to_uint8``).

The cache lives under the project's cache folder, never beside the data. Entries are keyed by
the sha256 of the file bytes, in one store per (cache version, mode, size), so a renamed or
duplicated file is decoded once and a changed file is decoded again.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

CACHE_VERSION = 1  # bump when decoding or preprocessing changes what a stored image looks like
MODES = ("full", "cell")
UNDECODABLE = -1  # index row of a file whose bytes are known not to decode
FLUSH_EVERY = 512  # newly decoded images written to the store per batch
PROGRESS_MIN_FILES = 500  # runs over at least this many files report progress on stderr

T = TypeVar("T")
R = TypeVar("R")

# What Pillow raises on files that are not images, truncated or otherwise corrupt.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                 Image.DecompressionBombError)


def file_digest(data: bytes) -> str:
    """Hex sha256 of a file's bytes: the cache key and the duplicate detector."""
    return hashlib.sha256(data).hexdigest()


def probe_image(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, after a cheap full read that catches corrupt files.

    JPEGs are read at 1/8 scale; raises one of ``DECODE_ERRORS`` if the bytes do not decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        image.draft(image.mode, (1, 1))
        image.load()
    return size


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Greyscale wider than 8 bits to uint8, by range rather than by clipping.

    uint16 (16-bit TIFF/PNG) is scaled by 255/65535. 32-bit int or float values are read as
    8-bit if they stay within 0..255 (floats within 0..1 as fractions) and as 16-bit if within
    0..65535; anything wider is stretched from 0 to its maximum.
    """
    if values.dtype == np.uint16:
        full_scale = 65535.0
    else:
        top = float(values.max(initial=0))
        if values.dtype.kind == "f" and top <= 1.0:
            full_scale = 1.0
        else:
            full_scale = next((s for s in (255.0, 65535.0) if top <= s), top)
    scaled = np.rint(values.astype(np.float64) * (255.0 / full_scale))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of any Pillow image (alpha composited on white)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(scale_to_uint8(np.asarray(image))).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def border_colour(image: Image.Image) -> tuple[int, int, int]:
    """Per-channel median of the outermost pixel ring of an RGB image."""
    pixels = np.asarray(image)
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    red, green, blue = np.median(ring, axis=0)
    return int(red), int(green), int(blue)


def pad_to_square(image: Image.Image) -> Image.Image:
    """``image`` centred on a square canvas of its border colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), border_colour(image))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def decode_image(data: bytes, size: int, mode: str = "full") -> np.ndarray:
    """Uint8 (size, size, 3) image from encoded bytes, preprocessed by ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; known: {', '.join(MODES)}")
    with Image.open(io.BytesIO(data)) as image:
        if mode == "cell":
            from common.fov import crop_to_cell

            return crop_to_cell(np.asarray(to_rgb(image)), size)
        image.draft("RGB", (size, size))
        square = pad_to_square(to_rgb(image))
    resized = square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


class ImageStore:
    """Decoded images of one (mode, size): ``pixels.u8`` rows plus an ``index.json``.

    ``index.json`` maps a file's sha256 to its row in ``pixels.u8`` (``UNDECODABLE`` when the
    bytes do not decode). Writers hold an exclusive ``flock`` on ``lock``, append and fsync
    the rows, then atomically replace the index; readers take no lock and never see an entry
    whose pixels are not on disk. Rows past the index's count are left by an interrupted
    writer and cut off by the next one.
    """

    def __init__(self, cache_dir: Path, size: int, mode: str) -> None:
        self.root = Path(cache_dir) / "images" / f"v{CACHE_VERSION}-{mode}-{size}"
        self.shape = (size, size, 3)
        self.row_bytes = size * size * 3

    @property
    def _index_path(self) -> Path:
        return self.root / "index.json"

    @property
    def _pixels_path(self) -> Path:
        return self.root / "pixels.u8"

    def read_index(self) -> tuple[int, dict[str, int]]:
        """(rows on disk, digest -> row) as last committed."""
        try:
            index = json.loads(self._index_path.read_text())
        except FileNotFoundError:
            return 0, {}
        return index["rows"], index["entries"]

    def rows(self, rows: Sequence[int]) -> np.ndarray:
        """Copy of the given rows, uint8 (len(rows), S, S, 3), read through a memory map."""
        n_rows, _ = self.read_index()
        if not len(rows):
            return np.empty((0, *self.shape), np.uint8)
        pixels = np.memmap(self._pixels_path, np.uint8, "r", shape=(n_rows, *self.shape))
        return np.asarray(pixels[np.asarray(rows, dtype=np.int64)])

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, decoded: dict[str, np.ndarray | None]) -> dict[str, int]:
        """Store images by digest (None: undecodable); returns the committed index."""
        with self._locked():
            n_rows, entries = self.read_index()
            new = {d: image for d, image in decoded.items() if d not in entries}
            if not new:
                return entries
            with self._pixels_path.open("ab") as pixels:
                pixels.truncate(n_rows * self.row_bytes)
                for digest, image in new.items():
                    if image is None:
                        entries[digest] = UNDECODABLE
                    else:
                        pixels.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
                        entries[digest] = n_rows
                        n_rows += 1
                pixels.flush()
                os.fsync(pixels.fileno())
            partial = self._index_path.with_suffix(f".{os.getpid()}.tmp")
            with partial.open("w") as index:
                json.dump({"rows": n_rows, "entries": entries}, index)
                index.flush()
                os.fsync(index.fileno())
            os.replace(partial, self._index_path)
            return entries


@dataclass(frozen=True)
class LoadedImages:
    """The readable files of a load, in input order, and the paths that were not readable."""

    images: np.ndarray  # uint8 (M, S, S, 3)
    digests: tuple[str, ...]  # sha256 of each readable file
    readable: np.ndarray  # int64 indices (into the input paths) of the readable files
    unreadable: tuple[Path, ...]


def map_with_progress(function: Callable[[T], R], items: Sequence[T], label: str,
                      ) -> Iterator[R]:
    """``function`` over ``items`` in a thread pool, in order; long runs report on stderr.

    On a terminal one line is rewritten in place; in a log about ten lines are written.
    """
    total = len(items)
    on_terminal = sys.stderr.isatty()
    step = 100 if on_terminal else max(100, total // 10)  # logs get about ten lines
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done, result in enumerate(pool.map(function, items), start=1):
            if total >= PROGRESS_MIN_FILES and (done % step == 0 or done == total):
                start, end = ("\r", "\n" if done == total else "") if on_terminal else ("", "\n")
                print(f"{start}{label}: {done}/{total} files", end=end, file=sys.stderr,
                      flush=True)
            yield result


def load_images(paths: Sequence[Path], size: int, cache_dir: Path, mode: str = "full",
                label: str = "decoding") -> LoadedImages:
    """Decode ``paths`` through the cache; files that cannot be read or decoded are listed.

    Every file is read and hashed; only digests missing from the cache are decoded (in a
    thread pool), and new images are committed in batches so an interrupted load keeps them.
    """
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; known: {', '.join(MODES)}")
    store = ImageStore(cache_dir, size, mode)
    _, cached = store.read_index()

    def read_and_decode(path: Path) -> tuple[str | None, np.ndarray | None]:
        try:
            data = Path(path).read_bytes()
        except OSError:
            return None, None
        digest = file_digest(data)
        if digest in cached:
            return digest, None
        try:
            return digest, decode_image(data, size, mode)
        except DECODE_ERRORS:
            return digest, None

    digests: list[str | None] = []
    pending: dict[str, np.ndarray | None] = {}
    for digest, image in map_with_progress(read_and_decode, paths, label):
        digests.append(digest)
        if digest is not None and digest not in cached:
            pending[digest] = image
        if len(pending) >= FLUSH_EVERY:
            store.add(pending)
            pending.clear()
    index = store.add(pending) if pending else store.read_index()[1]
    rows = [index.get(d, UNDECODABLE) if d is not None else UNDECODABLE for d in digests]
    readable = np.flatnonzero(np.asarray(rows, dtype=np.int64) != UNDECODABLE)
    return LoadedImages(
        images=store.rows([rows[i] for i in readable]),
        digests=tuple(digests[i] for i in readable),
        readable=readable,
        unreadable=tuple(Path(paths[i]) for i in range(len(paths)) if rows[i] == UNDECODABLE),
    )
