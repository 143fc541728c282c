"""Decoding to square RGB uint8 and a content-addressed, memory-mapped on-disk image cache.

Preprocessing (``mode``):

* ``full``: the whole image, padded to a square with the median colour of its border (the
  slide background, so no cell is squashed and no black frame is learnt), then resized with
  Lanczos antialiasing. JPEGs are first decoded at the smallest DCT scale that still exceeds
  the target size, which is faster and itself antialiased.
* ``cell``: ``common.fov.crop_to_cell`` on the original decoded image, a cell-centred view;
  images where no cell is found fall back to a centre crop and are counted
  (``LoadedImages.cell_fallback``).

Every image is first made 8-bit RGB: transparency is composited on white, palette, greyscale,
CMYK and YCbCr are converted, and 16-bit (or wider) greyscale is scaled by its range, never
clipped and never through a float64 copy (see ``scale_to_uint8``).

Decoding is guarded: an image of more than ``MAX_PIXELS`` pixels (read from its header) or a
file of more than ``MAX_FILE_BYTES`` is refused before anything is decoded, with an error
naming its size, and counted as unreadable; files are read and decoded by a bounded pool of
at most ``MAX_WORKERS`` threads, with a bounded number of files in flight.

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
import re
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import Image

from common.fov import border_colour
from common.progress import progress_bar

CACHE_VERSION = 3  # bump when decoding or preprocessing changes what a stored image looks like
MODES = ("full", "cell")
UNDECODABLE = -1  # index row of a file whose bytes are known not to decode
FLUSH_EVERY = 512  # newly decoded images written to the store per batch
PROGRESS_MIN_FILES = 500  # runs over at least this many files show a progress bar on stderr
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (not Pillow's 179 MP)
MAX_FILE_BYTES = 512 * 2**20  # larger files are refused without being read
MAX_WORKERS = 8  # decoding threads at most, fewer when fewer CPUs are available

UINT16_TO_UINT8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)  # rint(v/257)

T = TypeVar("T")
R = TypeVar("R")


class ImageTooLarge(ValueError):
    """An image with more pixels than ``MAX_PIXELS``, refused before it is decoded."""


# What Pillow raises on files that are not images, truncated or otherwise corrupt.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                 Image.DecompressionBombError)


def file_digest(data: bytes) -> str:
    """Hex sha256 of a file's bytes: the cache key and the duplicate detector."""
    return hashlib.sha256(data).hexdigest()


def open_image(data: bytes) -> Image.Image:
    """Pillow image of encoded bytes, header read only; ``ImageTooLarge`` (naming the size and
    the limit) if it has more than ``MAX_PIXELS`` pixels, one of ``DECODE_ERRORS`` if the bytes
    are not an image."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # beyond twice Pillow's own limit
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels[1]):,}" if pixels else f"over {2 * Image.MAX_IMAGE_PIXELS:,}"
        raise ImageTooLarge(f"image of {size} pixels refused; the limit is {MAX_PIXELS:,} "
                            "pixels") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ImageTooLarge(f"image of {width} x {height} = {width * height:,} pixels refused; "
                            f"the limit is {MAX_PIXELS:,} pixels")
    return image


def probe_image(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, after a cheap full read that catches corrupt files.

    JPEGs are read at 1/8 scale; raises one of ``DECODE_ERRORS`` if the bytes do not decode or
    the image has more than ``MAX_PIXELS`` pixels.
    """
    with open_image(data) as image:
        size = image.size
        image.draft(image.mode, (1, 1))
        image.load()
    return size


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Greyscale wider than 8 bits to uint8, by range rather than by clipping.

    uint16 (16-bit TIFF/PNG) is scaled by 255/65535 through a lookup table. 32-bit int or float
    values are read as 8-bit if they stay within 0..255 (floats within 0..1 as fractions) and
    as 16-bit if within 0..65535; anything wider is stretched from 0 to its maximum. No
    float64 copy is made: at most one float32 copy of the image.
    """
    if values.dtype == np.uint16:
        return UINT16_TO_UINT8[values]
    top = float(values.max(initial=0))
    if values.dtype.kind == "f" and top <= 1.0:
        full_scale = 1.0
    else:
        full_scale = next((s for s in (255.0, 65535.0) if top <= s), top)
    scaled = values.astype(np.float32)
    scaled *= np.float32(255.0 / full_scale)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of any Pillow image (alpha composited on white); RGB images as
    they are."""
    if image.mode == "RGB" and "transparency" not in image.info:
        image.load()
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(scale_to_uint8(np.asarray(image))).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def pad_to_square(image: Image.Image) -> Image.Image:
    """``image`` centred on a square canvas of its border colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), border_colour(image))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def decode_image(data: bytes, size: int, mode: str = "full") -> tuple[np.ndarray, bool]:
    """Uint8 (size, size, 3) image from encoded bytes, preprocessed by ``mode``, and whether the
    cell was found (False only in ``cell`` mode when the view fell back to a centre crop).

    Raises ``ImageTooLarge`` or another of ``DECODE_ERRORS`` when the bytes are refused.
    """
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; known: {', '.join(MODES)}")
    with open_image(data) as image:
        if mode == "cell":
            from common.fov import crop_to_cell, find_cell

            rgb = to_rgb(image)
            box = find_cell(rgb)
            return crop_to_cell(rgb, size, box=box), box.found
        image.draft("RGB", (size, size))
        square = pad_to_square(to_rgb(image))
        resized = square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8), True


@dataclass(frozen=True)
class Decoded:
    """What became of one file's bytes: its pixels (None: undecodable, ``error`` says why) and
    whether its cell view fell back to a centre crop."""

    pixels: np.ndarray | None
    cell_fallback: bool = False
    error: str = ""


class StoreIndex(NamedTuple):
    """``index.json`` of an ``ImageStore``: rows on disk, digest -> row, digests whose cell view
    fell back to a centre crop, and why undecodable digests did not decode."""

    rows: int
    entries: dict[str, int]
    cell_fallback: frozenset[str]
    errors: dict[str, str]


class ImageStore:
    """Decoded images of one (mode, size): ``pixels.u8`` rows plus an ``index.json``.

    ``index.json`` maps a file's sha256 to its row in ``pixels.u8`` (``UNDECODABLE`` when the
    bytes do not decode, with the reason), and lists the digests whose cell view fell back.
    Writers hold an exclusive ``flock`` on ``lock``, append and fsync the rows, then atomically
    replace the index; readers take no lock and never see an entry whose pixels are not on
    disk. Rows past the index's count are left by an interrupted writer and cut off by the next
    one.
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

    def read_index(self) -> StoreIndex:
        """The index as last committed (empty if there is none)."""
        try:
            index = json.loads(self._index_path.read_text())
        except FileNotFoundError:
            return StoreIndex(0, {}, frozenset(), {})
        return StoreIndex(index["rows"], index["entries"], frozenset(index["cell_fallback"]),
                          index["errors"])

    def rows(self, rows: Sequence[int]) -> np.ndarray:
        """Copy of the given rows, uint8 (len(rows), S, S, 3), read through a memory map."""
        n_rows = self.read_index().rows
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

    def add(self, decoded: Mapping[str, np.ndarray | Decoded | None]) -> StoreIndex:
        """Store images by digest (an array, a ``Decoded``, or None: undecodable); returns the
        committed index."""
        with self._locked():
            n_rows, entries, fallback, errors = self.read_index()
            fallback, errors = set(fallback), dict(errors)
            new = {d: item if isinstance(item, Decoded) else Decoded(item)
                   for d, item in decoded.items() if d not in entries}
            if not new:
                return StoreIndex(n_rows, entries, frozenset(fallback), errors)
            with self._pixels_path.open("ab") as pixels:
                pixels.truncate(n_rows * self.row_bytes)
                for digest, item in new.items():
                    if item.pixels is None:
                        entries[digest] = UNDECODABLE
                        errors[digest] = item.error or "does not decode"
                        continue
                    pixels.write(np.ascontiguousarray(item.pixels, dtype=np.uint8).tobytes())
                    entries[digest] = n_rows
                    n_rows += 1
                    if item.cell_fallback:
                        fallback.add(digest)
                pixels.flush()
                os.fsync(pixels.fileno())
            partial = self._index_path.with_suffix(f".{os.getpid()}.tmp")
            with partial.open("w") as index:
                json.dump({"rows": n_rows, "entries": entries,
                           "cell_fallback": sorted(fallback), "errors": errors}, index)
                index.flush()
                os.fsync(index.fileno())
            os.replace(partial, self._index_path)
            return StoreIndex(n_rows, entries, frozenset(fallback), errors)


@dataclass(frozen=True)
class LoadedImages:
    """The readable files of a load, in input order, and the paths that were not readable."""

    images: np.ndarray  # uint8 (M, S, S, 3)
    digests: tuple[str, ...]  # sha256 of each readable file
    readable: np.ndarray  # int64 indices (into the input paths) of the readable files
    unreadable: tuple[Path, ...]
    errors: tuple[str, ...] = ()  # "<path>: why" for each unreadable file, in the same order
    cell_fallback: np.ndarray | None = None  # bool per readable image: cell view fell back

    @property
    def fallback_count(self) -> int:
        """Readable images whose cell view fell back to a centre crop (0 in ``full`` mode)."""
        return 0 if self.cell_fallback is None else int(self.cell_fallback.sum())


def worker_count() -> int:
    """Decoding workers: the CPUs this process may use, at most ``MAX_WORKERS``."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def bounded_map(function: Callable[[T], R], items: Iterable[T], executor: Executor,
                in_flight: int) -> Iterator[R]:
    """``function`` over ``items`` on ``executor``, in order, with at most ``in_flight`` calls
    submitted and not yet consumed (so results never pile up in memory)."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(executor.submit(function, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def map_with_progress(function: Callable[[T], R], items: Sequence[T], label: str) -> Iterator[R]:
    """``function`` over ``items`` in a pool of ``worker_count()`` threads, in order; runs over
    at least ``PROGRESS_MIN_FILES`` items show one progress bar on stderr."""
    with (ThreadPoolExecutor(worker_count()) as pool,
          progress_bar(len(items), label, disable=len(items) < PROGRESS_MIN_FILES) as bar):
        for result in bounded_map(function, items, pool, 4 * worker_count()):
            bar.update()
            yield result


def read_file(path: Path) -> bytes:
    """The bytes of ``path``; OSError (naming the size) for files over ``MAX_FILE_BYTES``."""
    size = Path(path).stat().st_size
    if size > MAX_FILE_BYTES:
        raise OSError(f"file of {size:,} bytes refused; the limit is {MAX_FILE_BYTES:,} bytes")
    return Path(path).read_bytes()


def load_images(paths: Sequence[Path], size: int, cache_dir: Path, mode: str = "full",
                label: str = "decoding") -> LoadedImages:
    """Decode ``paths`` through the cache; files that cannot be read or decoded are listed
    with the reason (never decoded if larger than ``MAX_PIXELS`` or ``MAX_FILE_BYTES``).

    Every file is read and hashed; only digests missing from the cache are decoded (by a
    bounded pool of ``worker_count()`` threads), and new images are committed in batches so an
    interrupted load keeps them.
    """
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; known: {', '.join(MODES)}")
    store = ImageStore(cache_dir, size, mode)
    cached = store.read_index().entries.keys()

    def read_and_decode(path: Path) -> tuple[str | None, Decoded | None]:
        try:
            data = read_file(path)
        except OSError as error:
            return None, Decoded(None, error=f"cannot read: {error.strerror or error}")
        digest = file_digest(data)
        if digest in cached:
            return digest, None
        try:
            pixels, found = decode_image(data, size, mode)
        except DECODE_ERRORS as error:
            return digest, Decoded(None, error=str(error) or type(error).__name__)
        return digest, Decoded(pixels, cell_fallback=not found)

    digests: list[str | None] = []
    read_errors: dict[int, str] = {}
    pending: dict[str, Decoded] = {}
    for i, (digest, decoded) in enumerate(map_with_progress(read_and_decode, paths, label)):
        digests.append(digest)
        if digest is None:
            read_errors[i] = decoded.error
        elif decoded is not None:
            pending[digest] = decoded
        if len(pending) >= FLUSH_EVERY:
            store.add(pending)
            pending.clear()
    index = store.add(pending) if pending else store.read_index()
    rows = [index.entries.get(d, UNDECODABLE) if d is not None else UNDECODABLE
            for d in digests]
    readable = np.flatnonzero(np.asarray(rows, dtype=np.int64) != UNDECODABLE)
    unreadable = [i for i in range(len(paths)) if rows[i] == UNDECODABLE]
    return LoadedImages(
        images=store.rows([rows[i] for i in readable]),
        digests=tuple(digests[i] for i in readable),
        readable=readable,
        unreadable=tuple(Path(paths[i]) for i in unreadable),
        errors=tuple(f"{paths[i]}: "
                     f"{read_errors.get(i) or index.errors.get(digests[i], 'does not decode')}"
                     for i in unreadable),
        cell_fallback=np.array([digests[i] in index.cell_fallback for i in readable], bool)
        if mode == "cell" else None,
    )
