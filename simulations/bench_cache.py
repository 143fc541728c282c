"""First-load versus cached-load time of a shared centre (Barcelona by default).

    python -m simulations.bench_cache [--size 128] [--mode full] [--centre barcelona]

Loads the centre twice into a fresh temporary cache: the first load decodes every image, the
second only reads and hashes the files and copies the decoded rows from the cache.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common.centres import load_centre, read_centres
from common.data import CentreSpec
from common.imagecache import MODES

SHARED_CENTRES = Path(__file__).resolve().parent / "centres" / "shared-wbc.toml"


def timed_load(spec: CentreSpec, size: int, cache_dir: Path, mode: str) -> tuple[float, int]:
    """(seconds, images loaded) of one ``load_centre``."""
    start = time.perf_counter()
    data = load_centre(spec, size, cache_dir, mode)
    return time.perf_counter() - start, len(data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--mode", default="full", choices=MODES, help="preprocessing")
    parser.add_argument("--centre", default="barcelona", help="centre of --centres to load")
    parser.add_argument("--centres", type=Path, default=SHARED_CENTRES, help="centres TOML")
    args = parser.parse_args(argv)
    specs = {spec.name: spec for spec in read_centres(args.centres)}
    if args.centre not in specs:
        parser.error(f"no centre {args.centre!r} in {args.centres}; it has {', '.join(specs)}")
    with tempfile.TemporaryDirectory(prefix="cytofed-bench-") as cache:
        first, n_images = timed_load(specs[args.centre], args.size, Path(cache), args.mode)
        cached, _ = timed_load(specs[args.centre], args.size, Path(cache), args.mode)
    print(f"{args.centre}: {n_images} images at {args.size} px ({args.mode}); "
          f"first load {first:.2f} s, cached load {cached:.2f} s, {first / cached:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
