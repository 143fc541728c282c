"""Cell-view preprocessing: this tree against the code before the wide-field cell finder.

    python -m simulations.bench_cellview [--size 64] [--limit N] [--sample K] [--baseline REV]

Loads every image of each shared centre with ``field-of-view = "cell"`` into an empty,
private cache, once with the ``common`` package of ``--baseline`` (extracted with
``git archive``) and once with this tree's, each in its own process, alternating per centre.
Prints each first load's images/s (wall clock) and CPU ms per image (all threads of the
loading process, the load alone), and the ratios, all measured in this one run.

Then compares the crops on every ``--sample``-th image where the baseline's finder was right
(found, a nucleus box under 0.85 of the short side whose centre lies within a quarter of the
short side of the image centre, as in these cell-centred datasets): how far apart the two
crop windows are, in pixels of the ``--size`` crop, and the mean absolute difference of the
two stored crops in grey levels.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from common import fov
from common.centres import read_centres, usable_records
from common.imagecache import ImageStore, to_rgb

REPO = Path(__file__).resolve().parents[1]
SHARED_CENTRES = REPO / "simulations" / "centres" / "shared-wbc.toml"
BASELINE = "27621e439ce091b22d444ca884742b9a957a6fac"  # main before the wide-field finder
LOAD = """
import json, sys, time
from pathlib import Path
from common.imagecache import load_images
args = json.loads(Path(sys.argv[1]).read_text())
start, cpu = time.perf_counter(), time.process_time()
loaded = load_images([Path(p) for p in args["paths"]], args["size"], Path(args["cache"]), "cell")
print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                  "images": len(loaded.readable),
                  "fallback": getattr(loaded, "fallback_count", None)}))
"""


def extract_baseline(revision: str, into: Path) -> Path:
    """The ``common`` package of ``revision`` written under ``into``; returns ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "common"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def timed_load(code_root: Path, paths: Sequence[Path], size: int, cache: Path,
               work: Path) -> dict:
    """First load of ``paths`` by the ``common`` package under ``code_root``, in a fresh
    process: its seconds, CPU seconds (all its threads), images and cell fallbacks."""
    request = work / "request.json"
    request.write_text(json.dumps({"paths": [str(p) for p in paths], "size": size,
                                   "cache": str(cache)}))
    result = subprocess.run([sys.executable, "-c", LOAD, str(request)], check=True,
                            capture_output=True, text=True, cwd=work,
                            env={**os.environ, "PYTHONPATH": str(code_root)})
    return json.loads(result.stdout.splitlines()[-1])


def load_module(name: str, path: Path) -> ModuleType:
    """The module at ``path`` under ``name`` (the baseline's self-contained ``fov.py``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def stored_crops(cache: Path, size: int, version_dir: str) -> tuple[dict[str, int], np.ndarray]:
    """(digest -> row, pixels) of a cell store, read from its files (any cache version)."""
    root = cache / "images" / version_dir
    index = json.loads((root / "index.json").read_text())
    pixels = np.memmap(root / "pixels.u8", np.uint8, "r", shape=(index["rows"], size, size, 3))
    return index["entries"], pixels


def baseline_was_right(box: object, shape: tuple[int, int]) -> bool:
    """The baseline found a plausible nucleus near the centre of a cell-centred image."""
    short_side = min(shape)
    offset = np.hypot(box.cy - shape[0] / 2, box.cx - shape[1] / 2)
    return bool(box.found and box.size < 0.85 * short_side and offset < 0.25 * short_side)


def compare_crops(paths: Sequence[Path], old_fov: ModuleType, size: int,
                  old_store: tuple[dict[str, int], np.ndarray],
                  new_store: tuple[dict[str, int], np.ndarray]) -> dict:
    """Window gap (crop pixels) and mean absolute crop difference on the images of ``paths``
    where the baseline was right."""
    import hashlib

    gaps, differences = [], []
    for path in paths:
        data = Path(path).read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = to_rgb(image)
        except OSError:
            continue
        pixels = np.asarray(rgb)
        old_box = old_fov.find_cell(pixels)
        if not baseline_was_right(old_box, pixels.shape[:2]):
            continue
        old_window = old_fov.crop_window(old_box, pixels.shape, 2.2)
        new_window = fov.crop_window(fov.find_cell(rgb), pixels.shape, 2.2)
        scale = size / (old_window[2] - old_window[0])
        gaps.append(scale * max(abs(a - b) for a, b in zip(old_window, new_window, strict=True)))
        digest = hashlib.sha256(data).hexdigest()
        old_row, new_row = old_store[0].get(digest, -1), new_store[0].get(digest, -1)
        if old_row >= 0 and new_row >= 0:
            difference = np.abs(old_store[1][old_row].astype(np.int16) - new_store[1][new_row])
            differences.append(float(difference.mean()))
    gaps = np.asarray(gaps)
    return {"right": len(gaps), "within_1px": float((gaps <= 1).mean()) if len(gaps) else 0.0,
            "gap_median": float(np.median(gaps)) if len(gaps) else 0.0,
            "gap_p95": float(np.percentile(gaps, 95)) if len(gaps) else 0.0,
            "mean_abs_median": float(np.median(differences)) if differences else 0.0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="crop side in pixels")
    parser.add_argument("--centres", type=Path, default=SHARED_CENTRES, help="centres TOML")
    parser.add_argument("--limit", type=int, default=0, help="at most N images per centre")
    parser.add_argument("--sample", type=int, default=10,
                        help="compare crops on every K-th image (0: skip the comparison)")
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cytofed-bench-cellview-") as temporary:
        work = Path(temporary)
        baseline = extract_baseline(args.baseline, work / "baseline")
        old_fov = load_module("baseline_fov", baseline / "common" / "fov.py")
        totals = {"old": [0.0, 0.0, 0], "new": [0.0, 0.0, 0]}
        print(f"cell view at {args.size} px, first load into an empty cache, "
              f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}")
        for spec in read_centres(args.centres):
            paths = [record.path for record, _ in usable_records(spec)[0]]
            paths = paths[: args.limit] if args.limit else paths
            runs = {}
            for version, root in (("old", baseline), ("new", REPO)):
                cache = work / f"cache-{version}-{spec.name}"
                runs[version] = timed_load(root, paths, args.size, cache, work)
                for i, key in enumerate(("seconds", "cpu", "images")):
                    totals[version][i] += runs[version][key]
            old, new = runs["old"], runs["new"]
            print(f"{spec.name}: {new['images']} images; baseline "
                  f"{old['images'] / old['seconds']:.0f} images/s "
                  f"({1e3 * old['cpu'] / old['images']:.1f} CPU ms/image), this tree "
                  f"{new['images'] / new['seconds']:.0f} images/s "
                  f"({1e3 * new['cpu'] / new['images']:.1f} CPU ms/image): "
                  f"{old['seconds'] / new['seconds']:.2f}x faster, "
                  f"{old['cpu'] / new['cpu']:.2f}x less CPU; cell fallback {new['fallback']}")
            if args.sample:
                comparison = compare_crops(
                    paths[:: args.sample], old_fov, args.size,
                    stored_crops(work / f"cache-old-{spec.name}", args.size,
                                 f"v1-cell-{args.size}"),
                    stored_crops(work / f"cache-new-{spec.name}", args.size,
                                 ImageStore(work, args.size, "cell").root.name))
                print(f"  crops on {comparison['right']} images where the baseline was right: "
                      f"windows within 1 px {100 * comparison['within_1px']:.1f}%, gap median "
                      f"{comparison['gap_median']:.2f} px, p95 {comparison['gap_p95']:.2f} px; "
                      f"mean absolute pixel difference median "
                      f"{comparison['mean_abs_median']:.2f} grey levels")
        (old_s, old_cpu, images), (new_s, new_cpu, _) = totals["old"], totals["new"]
        print(f"all centres: {images} images; baseline {images / old_s:.0f} images/s, this tree "
              f"{images / new_s:.0f} images/s: {old_s / new_s:.2f}x faster "
              f"({old_cpu / new_cpu:.2f}x less CPU), load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
