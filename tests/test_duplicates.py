"""Images two centres hold: perceptual hashes, their cache, the inspector's list and a held-out
centre without them (through the function the ServerApp and the baselines call, and a LOCO run).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from common import duplicates
from common.centres import read_centres
from common.config import parse_run_config
from common.duplicates import (
    NEAR_DUPLICATE_SIMILARITY,
    SIGNATURE_LENGTH,
    cross_centre_duplicates,
    hash_centre,
    load_held_out,
    near_pairs,
    perceptual_hash,
    similarity,
)
from simulations.cli import main

CLASSES = ("neutrophil", "lymphocyte", "eosinophil")


def cell_photo(seed: int, size: tuple[int, int] = (72, 64)) -> np.ndarray:
    """Uint8 (height, width, 3): a smooth random stain pattern, different in layout per seed
    (unlike plain discs, which differ only in colour and so hash alike)."""
    width, height = size
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(height, width)), 4)
    field = (field - field.min()) / np.ptp(field)
    return np.stack([230 - 150 * field, 200 - 120 * field, 220 - 60 * field], -1).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str = "PNG", scale: float = 1.0, **options) -> bytes:
    image = Image.fromarray(pixels)
    if scale != 1.0:
        width, height = image.size
        image = image.resize((round(width * scale), round(height * scale)),
                             Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def alike(a: bytes, b: bytes) -> float:
    """Similarity of the perceptual hashes of two encoded images."""
    return float(similarity(perceptual_hash(a), perceptual_hash(b))[0, 0])


def write_centre(root: Path, seeds: range) -> None:
    """Class folders of PNG cell photos, one per seed, dealt to the classes in turn."""
    for seed in seeds:
        path = root / CLASSES[seed % len(CLASSES)] / f"cell_{seed}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(cell_photo(seed)))


def write_centres_with_shared_images(tmp_path: Path) -> Path:
    """Centres ``a`` and ``b`` (12 cells each) and ``held`` (9 cells of its own, a
    byte-identical copy of one of a's cells and a half-size JPEG of one of b's) in
    ``tmp_path``; returns their centres file."""
    write_centre(tmp_path / "a", range(0, 12))
    write_centre(tmp_path / "b", range(100, 112))
    write_centre(tmp_path / "held", range(200, 209))
    (tmp_path / "held" / "neutrophil" / "same_as_a.png").write_bytes(
        (tmp_path / "a" / "neutrophil" / "cell_0.png").read_bytes())
    (tmp_path / "held" / "lymphocyte" / "smaller_b.jpg").write_bytes(
        encoded(cell_photo(100), "JPEG", scale=0.5, quality=75))
    toml = tmp_path / "centres.toml"
    toml.write_text("".join(f'[[centre]]\nname = "{name}"\npath = "{name}"\nformat = "folder"\n\n'
                            for name in ("a", "b", "held")))
    return toml


@pytest.fixture
def centres_with_shared_images(tmp_path: Path) -> Path:
    return write_centres_with_shared_images(tmp_path)


@pytest.mark.parametrize(("fmt", "scale", "options"), [
    ("JPEG", 0.5, {"quality": 60}), ("JPEG", 1.7, {"quality": 90}), ("WEBP", 0.8, {}),
    ("BMP", 1.0, {}), ("PNG", 0.4, {})])
def test_a_resized_re_encoded_copy_is_a_near_duplicate(fmt, scale, options):
    original = cell_photo(7)
    assert alike(encoded(original), encoded(original, fmt, scale, **options)) >= \
        NEAR_DUPLICATE_SIMILARITY


def test_different_cells_are_far_apart():
    hashes = np.array([perceptual_hash(encoded(cell_photo(seed))) for seed in range(30)])
    alike_pairs = similarity(hashes, hashes)[np.triu_indices(30, 1)]
    assert hashes.shape == (30, SIGNATURE_LENGTH)
    assert alike_pairs.max() < 0.8 < NEAR_DUPLICATE_SIMILARITY


def test_near_pairs_finds_every_pair_within_the_bound():
    rng = np.random.default_rng(0)
    a = rng.integers(-127, 128, (300, SIGNATURE_LENGTH)).astype(np.int8)
    b = rng.integers(-127, 128, (50, SIGNATURE_LENGTH)).astype(np.int8)
    b[3] = np.clip(a[17].astype(int) + rng.integers(-8, 9, SIGNATURE_LENGTH), -127, 127)
    b[9] = a[250] // 2  # the same direction at half the contrast
    pairs = near_pairs(a, b, chunk=7)
    assert [(i, j) for i, j, _ in pairs] == [(17, 3), (250, 9)]
    assert NEAR_DUPLICATE_SIMILARITY <= pairs[0][2] < 1
    assert pairs[1][2] == pytest.approx(1, abs=1e-3)
    every = similarity(a, b)
    assert [(i, j) for i, j in zip(*np.nonzero(every >= NEAR_DUPLICATE_SIMILARITY),
                                   strict=True)] == [(17, 3), (250, 9)]


def test_near_pairs_multiply_on_one_blas_thread(monkeypatch):
    # OpenBLAS's thread pool hung once in a ServerApp thread (see near_pairs).
    from threadpoolctl import threadpool_info

    from common import duplicates

    seen = []
    unit = duplicates._unit

    def recording_unit(signatures):
        seen.append({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})
        return unit(signatures)

    monkeypatch.setattr(duplicates, "_unit", recording_unit)
    rng = np.random.default_rng(0)
    signatures = rng.integers(-127, 128, (64, SIGNATURE_LENGTH)).astype(np.int8)
    assert [(i, j) for i, j, _ in near_pairs(signatures, signatures, chunk=16)][:2] == [
        (0, 0), (1, 1)]
    assert seen[1:] and all(threads == {1} for threads in seen[1:])  # seen[0]: before


def test_hashes_are_cached_by_file_digest(centres_with_shared_images, tmp_path, monkeypatch):
    spec = read_centres(centres_with_shared_images)[0]
    first = hash_centre(spec, tmp_path / "cache")
    (tmp_path / "a" / "eosinophil" / "cell_2.png").rename(tmp_path / "a" / "eosinophil" / "x.png")

    def refuse(data: bytes) -> bytes:
        raise AssertionError("hashed although the cache holds the file's hash")

    monkeypatch.setattr(duplicates, "perceptual_hash", refuse)
    second = hash_centre(spec, tmp_path / "cache")
    assert sorted(second.digests) == sorted(first.digests)
    assert (tmp_path / "cache" / "hashes").is_dir()


def test_inspect_lists_images_two_centres_hold(centres_with_shared_images, tmp_path, capsys):
    shared = cross_centre_duplicates(read_centres(centres_with_shared_images),
                                     tmp_path / "cache")
    assert {(s.centre, s.file, s.other_centre, s.other_file, s.exact) for s in shared} == {
        ("a", "neutrophil/cell_0.png", "held", "neutrophil/same_as_a.png", True),
        ("b", "lymphocyte/cell_100.png", "held", "lymphocyte/smaller_b.jpg", False)}

    assert main(["data", "inspect", str(centres_with_shared_images), "--image-size", "16",
                 "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in report["centres"]] == ["a", "b", "held"]
    assert report["centres"][2]["loaded"]["images"] == 11
    assert report["cross_centre_duplicates"]["left_out_if_held_out"] == {"a": 1, "b": 1,
                                                                         "held": 2}
    assert main(["data", "inspect", str(centres_with_shared_images), "--image-size", "16",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "a:neutrophil/cell_0.png = held:neutrophil/same_as_a.png (exact)" in out
    assert "b:lymphocyte/cell_100.png = held:lymphocyte/smaller_b.jpg (near, " in out
    assert "left out of a centre when it is held out: a 1, b 1, held 2" in out


def run_config(centres: Path, tmp_path: Path, **overrides) -> dict:
    return {"data-source": str(centres), "held-out": "held", "image-size": 16,
            "cache-dir": str(tmp_path / "cache"), "model": "test_resnet", "device": "cpu",
            "num-server-rounds": 1, "augment": "none", **overrides}


def test_held_out_centre_loses_what_a_training_centre_has(centres_with_shared_images,
                                                          tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CYTOFED_CACHE_DIR", raising=False)
    config = parse_run_config(run_config(centres_with_shared_images, tmp_path))
    specs = read_centres(centres_with_shared_images)

    held_out = load_held_out(specs[2], specs[:2], config)

    assert len(held_out) == 9
    assert held_out.stats["shared_with_training"] == 2
    assert held_out.stats["training_centres_unchecked"] == 0
    assert "held-out centre held: 2 images also in a training centre left out, 9 kept" in \
        capsys.readouterr().out
    only_a = load_held_out(specs[2], specs[:1], config)
    assert only_a.stats["shared_with_training"] == 1 and len(only_a) == 10


def test_training_centres_whose_data_is_elsewhere_are_counted_unchecked(
        centres_with_shared_images, tmp_path, monkeypatch, capsys):
    """A deployment's server has the held-out centre but no training images."""
    monkeypatch.delenv("CYTOFED_CACHE_DIR", raising=False)
    config = parse_run_config(run_config(centres_with_shared_images, tmp_path))
    specs = read_centres(centres_with_shared_images)
    (tmp_path / "b").rename(tmp_path / "b-elsewhere")

    held_out = load_held_out(specs[2], specs[:2], config)

    assert held_out.stats["shared_with_training"] == 1
    assert held_out.stats["training_centres_unchecked"] == 1
    assert "not checked against b (no data here)" in capsys.readouterr().out


def test_loco_leaves_shared_images_out_of_the_held_out_centre(centres_with_shared_images,
                                                              tmp_path, monkeypatch):
    monkeypatch.delenv("CYTOFED_CACHE_DIR", raising=False)
    out = tmp_path / "loco"
    assert main(["loco", "--centres", str(centres_with_shared_images), "--held-out", "held",
                 "--strategies", "pooled", "--model", "test_resnet", "--image-size", "16",
                 "--rounds", "1", "--device", "cpu", "--out", str(out), "--run-config",
                 f"augment='none' cache-dir='{tmp_path / 'cache'}'"]) == 0
    [report_path] = out.glob("runs/*-held-pooled-ce-s0/report.json")
    report = json.loads(report_path.read_text())
    assert report["held_out_data"]["shared_with_training"] == 2
    confusion = np.asarray(report["best"]["held_out"]["confusion_matrix"])
    assert confusion.sum() == 9  # 11 images, 2 of them also in a or b
