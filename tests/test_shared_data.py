"""The three real centres of ``../shared/data/wbc``: exact counts, read by ``inspect_source``.

Skipped when the folder is absent. ``CYTOFED_SHARED_DATA`` points elsewhere. Counting reads
and checks every file but does not decode it fully, so this stays fast on two cores.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.data import CentreSpec
from common.duplicates import (
    NEAR_DUPLICATE_SIMILARITY,
    cross_centre_duplicates,
    hash_centre,
    perceptual_hash,
    similarity,
)
from common.inspect import inspect_source
from common.sources import detect_format
from common.taxonomy import map_label
from simulations.bench_duplicates import copies

SHARED = Path(os.environ.get("CYTOFED_SHARED_DATA",
                             Path(__file__).resolve().parents[1].parent / "shared/data/wbc"))
BARCELONA = SHARED / "PBC_dataset_normal_DIB"
JIANGXI = SHARED / "segmentation_WBC"
BCCD = SHARED / "BCCD"

pytestmark = pytest.mark.skipif(not BARCELONA.is_dir(), reason=f"no shared data at {SHARED}")


@pytest.fixture(scope="module")
def barcelona():
    return inspect_source(BARCELONA)


def test_layouts_are_detected():
    assert [detect_format(p) for p in (BARCELONA, JIANGXI, BCCD, BCCD / "BCCD_cropped")] == [
        "pbc", "zheng", "bccd", "bccd"]


def test_barcelona_wbc5_counts_drops_and_defects(barcelona):
    assert barcelona["format"] == "pbc"
    assert barcelona["target_counts"] == {"neutrophil": 1998, "lymphocyte": 728,
                                          "monocyte": 852, "eosinophil": 1870, "basophil": 731}
    dropped = Counter()
    for source_class, count in barcelona["dropped_counts"].items():
        dropped[source_class.removeprefix("pbc:").split("/")[0]] += count
    assert dropped == {"erythroblast": 931, "ig": 1737, "platelet": 200}
    assert barcelona["unreadable"] == ["neutrophil/.DS_169665.jpg"]
    assert barcelona["readable"] == 9047
    assert barcelona["duplicates"]["extra_copies"] == 3


def test_barcelona_wbc13_from_its_source_classes(barcelona):
    wbc13 = Counter()
    for source_class, count in barcelona["source_counts"].items():
        wbc13[map_label("pbc", source_class.removeprefix("pbc:"), "wbc13")] += count
    assert wbc13 == {"basophil": 731, "eosinophil": 1870, "erythroblast": 931,
                     "promyelocyte": 361, "myelocyte": 694, "metamyelocyte": 596,
                     "neutrophil_banded": 1003, "neutrophil_segmented": 967,
                     "monocyte": 852, "lymphocyte_typical": 728,
                     None: 86 + 28 + 200}  # IG, NEUTROPHIL (unspecified), platelet


def test_jiangxi_300_images_one_basophil():
    report = inspect_source(JIANGXI)
    assert report["format"] == "zheng" and report["readable"] == 300
    assert report["label_files"] == ["Class Labels of Dataset 1.csv: image ID = 'image ID', "
                                     "class label = 'class label' (by name, comma-separated)"]
    assert report["target_counts"] == {"neutrophil": 176, "lymphocyte": 53, "monocyte": 48,
                                       "eosinophil": 22, "basophil": 1}
    assert not report["unreadable"] and not report["dropped_counts"]


def test_bccd_351_crops():
    report = inspect_source(BCCD)
    assert report["format"] == "bccd" and report["readable"] == 351
    assert report["target_counts"] == {"neutrophil": 207, "lymphocyte": 33, "monocyte": 20,
                                       "eosinophil": 88, "basophil": 3}


@pytest.fixture(scope="module")
def shared_centres():
    return [CentreSpec("barcelona", BARCELONA, "pbc"), CentreSpec("jiangxi", JIANGXI, "zheng"),
            CentreSpec("bccd", BCCD, "bccd")]


@pytest.fixture(scope="module")
def hash_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_no_image_is_taken_for_one_of_another_centre(shared_centres, hash_cache):
    """Every pair of wbc5 images from two of the three centres (about 3.6 million) is compared;
    ``python -m simulations.bench_duplicates`` measures all 6 million pairs of all classes."""
    assert cross_centre_duplicates(shared_centres, hash_cache) == []


def test_resized_re_encoded_copies_of_real_cells_are_found(shared_centres, hash_cache):
    for spec in shared_centres:
        files = hash_centre(spec, hash_cache).files[::97][:3]
        for path in files:
            data = path.read_bytes()
            made = np.array([perceptual_hash(copy) for copy in copies(data)])
            assert similarity(perceptual_hash(data), made).min() >= NEAR_DUPLICATE_SIMILARITY
