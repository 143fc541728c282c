"""Images that more than one centre holds, and a held-out centre without them.

Public WBC sets are re-published inside one another, so a held-out centre can hold images a
training centre trains on, which inflates held-out scores silently. Two files are one image
when their bytes are identical (sha256) or their perceptual hashes are at least
``NEAR_DUPLICATE_SIMILARITY`` alike. The hash is a DCT signature, as in pHash: the 16 x 16
lowest frequencies (DC left out) of the 2-D DCT of the image in greyscale at 64 x 64,
quantised to int8, compared by cosine similarity. pHash's next step, keeping only each
coefficient's sign, is left out on purpose: on smooth images most of those coefficients are
near zero and re-encoding flips their signs (WebP and JPEG copies of a blurred test image
differed in 36-50 of 255 bits), while the coefficients themselves stay almost parallel. On the three
shared centres (``python -m simulations.bench_duplicates``) resized (0.4-2x) and re-encoded
(JPEG, WebP, PNG) copies kept a similarity of at least 0.998, different cells of different
centres reached at most 0.947. Mirrored, rotated or cropped copies are not found.

Hashes are cached under the project's cache folder, keyed by the file's sha256 like decoded
images, so only new or changed files are decoded again.

Finding shared images needs every centre's files on one machine: in simulation (``flwr run``
on one machine, ``cytofed loco``, ``cytofed data inspect CENTRES.toml``) they all are. In a
deployment the ServerApp holds no training images: it checks the held-out centre only against
the training centres whose data it can read, and counts those it could not check; a full check
would need the sites to share their hashes, which cytofed does not do.
"""

from __future__ import annotations

import fcntl
import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn
from threadpoolctl import threadpool_limits

from common.centres import load_centre, usable_records
from common.config import RunConfig
from common.data import CentreData, CentreSpec
from common.imagecache import DECODE_ERRORS, file_digest, map_with_progress, to_rgb
from common.sources import SYNTHETIC

HASH_VERSION = 1  # bump when the signature changes: cached ones are then computed anew
HASH_SIDE = 64  # greyscale side the DCT is taken of
HASH_FREQUENCIES = 16  # the lowest HASH_FREQUENCIES x HASH_FREQUENCIES coefficients are kept
SIGNATURE_LENGTH = HASH_FREQUENCIES**2 - 1  # without the DC term
NEAR_DUPLICATE_SIMILARITY = 0.99  # cosine similarity from which two files are one image


def perceptual_hash(data: bytes) -> np.ndarray:
    """The int8 DCT signature (``SIGNATURE_LENGTH`` values) of an encoded image; raises one
    of ``DECODE_ERRORS`` if the bytes do not decode."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (2 * HASH_SIDE, 2 * HASH_SIDE))
        grey = to_rgb(image).convert("L").resize((HASH_SIDE, HASH_SIDE),
                                                 Image.Resampling.LANCZOS)
    spectrum = dctn(np.asarray(grey, np.float64), norm="ortho")
    low = spectrum[:HASH_FREQUENCIES, :HASH_FREQUENCIES].ravel()[1:]
    peak = np.abs(low).max()
    return np.round(low * (127 / peak) if peak else low).astype(np.int8)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every signature in ``a`` (M, L) with every one in ``b`` (N, L)."""
    return _unit(a) @ _unit(b).T


def _unit(signatures: np.ndarray) -> np.ndarray:
    vectors = np.asarray(signatures, np.float32).reshape(-1, SIGNATURE_LENGTH)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class HashCache:
    """File sha256 -> signature, one ``.npz`` file (an all-zero signature: the bytes do not
    decode). Writers hold an exclusive ``flock``, merge their entries into what is on disk and
    replace the file atomically; readers take no lock."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = Path(cache_dir) / "hashes" / f"v{HASH_VERSION}-dct{HASH_FREQUENCIES}.npz"

    def read(self) -> dict[str, np.ndarray]:
        """What is cached; nothing when the file is missing or unreadable (it is rewritten)."""
        try:
            with np.load(self.path) as stored:
                return dict(zip(stored["digests"].tolist(), stored["signatures"], strict=True))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return {}

    def add(self, entries: dict[str, np.ndarray]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_suffix(".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {**self.read(), **entries}
            partial = self.path.with_suffix(f".{os.getpid()}.tmp")
            with partial.open("wb") as handle:
                np.savez(handle, digests=np.array(list(merged), dtype="U64"),
                         signatures=np.array(list(merged.values()), np.int8).reshape(
                             -1, SIGNATURE_LENGTH))
            os.replace(partial, self.path)


@dataclass(frozen=True)
class CentreHashes:
    """The readable image files a centre would load, their sha256 and signatures."""

    name: str
    root: Path  # file names are shown relative to it
    files: list[Path]
    digests: list[str]
    signatures: np.ndarray  # int8 (N, SIGNATURE_LENGTH)

    def relative(self, index: int) -> str:
        return os.path.relpath(self.files[index], self.root)


def _fingerprint(path: Path, known: dict[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """(sha256, signature; all zeros if the bytes do not decode) of a file, the signature from
    ``known`` when there; None if the file cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    digest = file_digest(data)
    if digest in known:
        return digest, known[digest]
    try:
        return digest, perceptual_hash(data)
    except DECODE_ERRORS:
        return digest, np.zeros(SIGNATURE_LENGTH, np.int8)


def hash_files(paths: Sequence[Path], cache_dir: Path,
               label: str = "hashing") -> list[tuple[str, np.ndarray] | None]:
    """(sha256, signature) of each file, None for a file that cannot be read; a file whose
    bytes do not decode gets an all-zero signature. Signatures come from the cache when it
    has the file's digest; new ones are computed in a thread pool and added to it."""
    cache = HashCache(cache_dir)
    known = cache.read()
    prints = list(map_with_progress(lambda p: _fingerprint(p, known), paths, label))
    new = {digest: value for digest, value in filter(None, prints) if digest not in known}
    if new:
        cache.add(new)
    return prints


def hash_centre(spec: CentreSpec, cache_dir: Path) -> CentreHashes:
    """Signatures of the files of ``spec`` that map to a class of its taxonomy and decode."""
    paths = [record.path for record, _ in usable_records(spec)[0]]
    prints = hash_files(paths, cache_dir, f"hashing {spec.name}")
    readable = [(path, *found) for path, found in zip(paths, prints, strict=True)
                if found and found[1].any()]
    root = Path(spec.path) if Path(spec.path).is_dir() else Path(spec.path).parent
    return CentreHashes(spec.name, root, [p for p, _, _ in readable],
                        [d for _, d, _ in readable],
                        np.array([s for _, _, s in readable], np.int8).reshape(
                            -1, SIGNATURE_LENGTH))


def near_pairs(a: np.ndarray, b: np.ndarray,
               min_similarity: float = NEAR_DUPLICATE_SIMILARITY,
               chunk: int = 1024) -> list[tuple[int, int, float]]:
    """(i, j, similarity) of every pair of signatures ``a[i]``, ``b[j]`` at least
    ``min_similarity`` alike; all pairs are compared, ``chunk`` rows of ``a`` at a time.

    The products run on one BLAS thread: called in the ServerApp's thread beside Flower's and
    Ray's, OpenBLAS's thread pool hung once in ``exec_blas`` (a test run of `cytofed bench
    --sites`, 25 minutes spinning with its worker asleep); one thread costs little here.
    """
    unit_b = _unit(b)
    pairs = []
    with threadpool_limits(limits=1, user_api="blas"):
        for start in range(0, len(a), chunk):
            alike = _unit(a[start:start + chunk]) @ unit_b.T
            pairs += [(start + int(i), int(j), float(alike[i, j]))
                      for i, j in zip(*np.nonzero(alike >= min_similarity), strict=True)]
    return pairs


@dataclass(frozen=True)
class SharedImage:
    """One image found in two centres, with the similarity of their signatures."""

    centre: str
    file: str
    other_centre: str
    other_file: str
    similarity: float
    exact: bool  # byte-identical files


def _shared(a: CentreHashes, b: CentreHashes) -> list[SharedImage]:
    return [SharedImage(a.name, a.relative(i), b.name, b.relative(j), round(alike, 4),
                        a.digests[i] == b.digests[j])
            for i, j, alike in near_pairs(a.signatures, b.signatures)]


def _file_based(specs: Sequence[CentreSpec]) -> list[CentreSpec]:
    return [s for s in specs if s.format != SYNTHETIC]


def cross_centre_duplicates(specs: Sequence[CentreSpec], cache_dir: Path) -> list[SharedImage]:
    """Every image pair, one file in each of two centres of ``specs``, that is the same image
    (exact or near duplicate); generated (synthetic) centres have no files to compare."""
    centres = [hash_centre(spec, cache_dir) for spec in _file_based(specs)]
    return [shared for a, b in combinations(centres, 2) for shared in _shared(a, b)]


def held_out_digests_in_training(held_out: CentreSpec, training: Sequence[CentreSpec],
                                 cache_dir: Path) -> set[str]:
    """The sha256 of every held-out file whose image a training centre also has."""
    centre = hash_centre(held_out, cache_dir)
    return {centre.digests[i] for spec in training
            for i, _, _ in near_pairs(centre.signatures,
                                      hash_centre(spec, cache_dir).signatures)}


def load_held_out(held_out: CentreSpec, training: Sequence[CentreSpec],
                  config: RunConfig) -> CentreData:
    """The held-out centre as ``config`` loads it, without the images a training centre also
    has: their count is ``stats["shared_with_training"]``, and the number of file-based
    training centres this machine cannot read, so could not be checked against (a
    deployment's server), ``stats["training_centres_unchecked"]``. Said on stdout."""
    from common.pipeline import cache_dir  # imports torch, which the inspector does without

    cache = cache_dir(config)
    load = {"image_size": config.image_size, "cache_dir": cache, "mode": config.field_of_view,
            "synthetic_images": config.synthetic_images}
    if held_out.format == SYNTHETIC:
        return load_centre(held_out, **load)
    here = [s for s in _file_based(training) if s.path is not None and Path(s.path).exists()]
    unchecked = [s.name for s in _file_based(training) if s not in here]
    data = load_centre(held_out, **load,
                       shared_with_training=held_out_digests_in_training(held_out, here, cache))
    data.stats["training_centres_unchecked"] = len(unchecked)
    left_out = data.stats["shared_with_training"]
    print(f"[cytofed] held-out centre {held_out.name}: {left_out} images also in a training "
          f"centre left out, {len(data)} kept"
          + (f"; not checked against {', '.join(unchecked)} (no data here)" if unchecked else ""),
          flush=True)
    return data
