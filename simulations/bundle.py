"""Real centres packed for a machine without ``../shared`` (the GPU machine), and unpacked there.

``pack`` writes, for every centre of a centres file, each image the centre loads at one
training size: its full view as ``<bundle>/<centre>/<n>.webp`` with a CSV manifest
(``path,label``, rows in the centre's load order, so the seeded splits match the originals'),
and its cell-centred view, cut from the original file, as ``<bundle>/cell/<centre>/<n>.webp``.
``<bundle>/centres.toml`` describes the packed centres with paths relative to itself.

``install`` fills the image cache of the other machine: the ``cell`` store of that size gets,
under each packed file's digest, the packed cell view, so ``field-of-view = "cell"`` shows the
crops of the original images rather than crops of the re-encoded full views. ``full`` needs
nothing: the packed files already are the full views at the training size. Both views are
lossy WebP (``QUALITY``: a mean absolute error of about 3 grey levels at 128 px, half the bytes
of JPEG at that error) to fit the device tool's 64 MiB transfer limit.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from common.centres import load_centre, read_centres
from common.data import CentreSpec
from common.imagecache import ImageStore, file_digest

QUALITY = 85  # WebP quality of both views
MANIFEST = "manifest.csv"


def _encode(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "WEBP", quality=QUALITY)
    return buffer.getvalue()


def _centre_toml(spec: CentreSpec) -> str:
    return (f'[[centre]]\nname = "{spec.name}"\npath = "{spec.name}/{MANIFEST}"\n'
            f'format = "manifest"\ntaxonomy = "{spec.taxonomy}"\n'
            f"split_seed = {spec.split_seed}\nshare_counts = {str(spec.share_counts).lower()}\n"
            f"share_stain = {str(spec.share_stain).lower()}\n")


def pack(centres_file: Path, bundle: Path, image_size: int, cache_dir: Path) -> int:
    """Write the bundle; returns its size in bytes."""
    tables = []
    for spec in read_centres(centres_file):
        full, cell = (load_centre(spec, image_size, cache_dir, mode=m) for m in ("full", "cell"))
        if not np.array_equal(full.labels, cell.labels):
            raise ValueError(f"centre {spec.name!r}: the two views load different images")
        folder, cell_folder = bundle / spec.name, bundle / "cell" / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        cell_folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for index, (label, image, crop) in enumerate(zip(full.labels, full.images, cell.images,
                                                         strict=True)):
            name = f"{index:05d}.webp"
            (folder / name).write_bytes(_encode(image))
            (cell_folder / name).write_bytes(_encode(crop))
            rows.append((name, full.classes[label]))
        with (folder / MANIFEST).open("w", newline="") as manifest:
            csv.writer(manifest).writerows([("path", "label"), *rows])
        tables.append(_centre_toml(spec))
    (bundle / "centres.toml").write_text("\n".join(tables))
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def install(bundle: Path, image_size: int, cache_dir: Path) -> int:
    """Put the packed cell views into ``cache_dir``'s cell store; returns the images added."""
    store = ImageStore(cache_dir, image_size, "cell")
    added = 0
    for spec in read_centres(bundle / "centres.toml"):
        folder = Path(spec.path).parent
        views = {}
        for path in sorted(folder.glob("*.webp")):
            with Image.open(bundle / "cell" / spec.name / path.name) as crop:
                views[file_digest(path.read_bytes())] = np.asarray(crop.convert("RGB"))
        if any(v.shape != (image_size, image_size, 3) for v in views.values()):
            raise ValueError(f"{folder}: cell views are not {image_size} px")
        store.add(views)
        added += len(views)
    return added


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.bundle", description=__doc__)
    parser.add_argument("action", choices=("pack", "install"))
    parser.add_argument("--bundle", type=Path, default=Path("gpu_bundle/data"))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/cytofed"))
    parser.add_argument("--centres", type=Path, default=Path("simulations/centres/shared-wbc.toml"))
    args = parser.parse_args()
    if args.action == "pack":
        size = pack(args.centres, args.bundle, args.image_size, args.cache_dir)
        print(f"packed {args.bundle}: {size / 2**20:.1f} MiB")
    else:
        added = install(args.bundle, args.image_size, args.cache_dir)
        print(f"installed {added} cell views into {args.cache_dir}")


if __name__ == "__main__":
    main()
