"""How well the perceptual hash of ``common.duplicates`` tells copies from different cells.

    python -m simulations.bench_duplicates [--centres FILE] [--copies 100] [--figure PNG]

On every readable file of every centre (all source classes, not only those a taxonomy keeps):

* hashing speed into a fresh cache, then from the cache (images/s);
* false matches: every pair of files from two different centres (different cells, as far as
  anyone knows) whose signatures are at least ``NEAR_DUPLICATE_SIMILARITY`` alike, over all such
  pairs, and the highest similarity among them;
* copies found: ``--copies`` files per centre, each resized (0.4x, 0.7x, 1.3x, 2x) and
  re-encoded (JPEG quality 50 and 90, WebP, PNG), matched against its original.

``--figure`` draws both similarity distributions and the threshold.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from common.centres import read_centres
from common.duplicates import NEAR_DUPLICATE_SIMILARITY, hash_files, perceptual_hash, similarity
from common.imagecache import map_with_progress
from common.sources import SYNTHETIC, read_records

SHARED_CENTRES = Path(__file__).resolve().parent / "centres" / "shared-wbc.toml"
SCALES = (0.4, 0.7, 1.3, 2.0)
ENCODINGS = (("JPEG", {"quality": 50}), ("JPEG", {"quality": 90}), ("WEBP", {"quality": 80}),
             ("PNG", {}))


def copies(data: bytes) -> list[bytes]:
    """``data`` resized by every scale and re-encoded in every encoding."""
    with Image.open(io.BytesIO(data)) as original:
        image = original.convert("RGB")
    made = []
    for scale in SCALES:
        resized = image.resize((max(8, round(image.width * scale)),
                                max(8, round(image.height * scale))), Image.Resampling.BICUBIC)
        for fmt, options in ENCODINGS:
            buffer = io.BytesIO()
            resized.save(buffer, fmt, **options)
            made.append(buffer.getvalue())
    return made


def copy_similarities(paths: Sequence[Path]) -> np.ndarray:
    """Similarity of each file's signature to those of its resized, re-encoded copies."""
    def compare(path: Path) -> np.ndarray:
        data = path.read_bytes()
        return similarity(perceptual_hash(data),
                          np.array([perceptual_hash(c) for c in copies(data)]))[0]

    return np.concatenate(list(map_with_progress(compare, paths, "copying")))


def draw(cross: np.ndarray, copied: np.ndarray, path: Path) -> None:
    """Histograms of 1 - similarity (log scale) of different cells and of copies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-5  # identical signatures are drawn here
    figure, axis = plt.subplots(figsize=(7, 3.5))
    bins = np.geomspace(floor, 2.0, 100)
    axis.hist(np.clip(1 - cross, floor, None), bins, color="tab:blue", alpha=0.7, log=True,
              label=f"different cells, two centres ({len(cross):,} pairs)")
    axis.hist(np.clip(1 - copied, floor, None), bins, color="tab:orange", alpha=0.8, log=True,
              label=f"resized, re-encoded copies ({len(copied):,})")
    axis.axvline(1 - NEAR_DUPLICATE_SIMILARITY, color="black", linestyle="--",
                 label=f"threshold (similarity {NEAR_DUPLICATE_SIMILARITY})")
    axis.set_xscale("log")
    axis.set_xlabel("1 - cosine similarity of the DCT signatures")
    axis.set_ylabel("pairs")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--centres", type=Path, default=SHARED_CENTRES, help="centres TOML")
    parser.add_argument("--copies", type=int, default=100, help="files per centre to copy")
    parser.add_argument("--figure", type=Path, help="write the similarity histogram here")
    args = parser.parse_args(argv)
    files = {spec.name: read_records(spec.path, spec.format)[1].records
             for spec in read_centres(args.centres) if spec.format != SYNTHETIC}
    paths = [record.path for records in files.values() for record in records]
    with tempfile.TemporaryDirectory(prefix="cytofed-bench-") as cache:
        seconds = []
        for _ in range(2):  # a fresh cache, then the same cache
            start = time.perf_counter()
            prints = hash_files(paths, Path(cache))
            seconds.append(time.perf_counter() - start)
    print(f"hashed {len(paths)} files: first {len(paths) / seconds[0]:.0f} images/s "
          f"({seconds[0]:.1f} s), cached {len(paths) / seconds[1]:.0f} images/s "
          f"({seconds[1]:.1f} s)")
    readable, offset = {}, 0  # centre -> [(path, signature)] of files that decode
    for name, records in files.items():
        found = prints[offset:offset + len(records)]
        offset += len(records)
        readable[name] = [(r.path, f[1]) for r, f in zip(records, found, strict=True)
                          if f and f[1].any()]
    signatures = {name: np.array([s for _, s in pairs]) for name, pairs in readable.items()}
    cross = np.concatenate([similarity(signatures[a], signatures[b]).ravel()
                            for a, b in combinations(signatures, 2)])
    false = int((cross >= NEAR_DUPLICATE_SIMILARITY).sum())
    print(f"false matches: {false} of {len(cross):,} pairs across "
          f"{', '.join(f'{n} ({len(s)})' for n, s in signatures.items())} "
          f"= {false / len(cross):.2e}; highest similarity {cross.max():.4f}")
    rng = np.random.default_rng(0)
    copied = copy_similarities([pairs[i][0] for pairs in readable.values() for i in rng.choice(
        len(pairs), min(args.copies, len(pairs)), replace=False)])
    found = int((copied >= NEAR_DUPLICATE_SIMILARITY).sum())
    print(f"copies found: {found} of {len(copied)} ({len(SCALES)} scales x {len(ENCODINGS)} "
          f"encodings) = {found / len(copied):.4f}; lowest similarity {copied.min():.4f}")
    if args.figure:
        draw(cross, copied, args.figure)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
