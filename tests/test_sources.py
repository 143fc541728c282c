"""Source layouts on fixture folders written here with real image encoding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.centres import load_centre
from common.data import CentreSpec
from common.imagecache import load_images
from common.inspect import inspect_source
from common.sources import SOURCE_FORMATS, detect_format, read_records
from common.taxonomy import map_label


def classes_of(records, root):
    return [(r.path.relative_to(root).as_posix(), r.source_class) for r in records]


def test_matek_layout_and_16_bit_greyscale_tiff(tmp_path, write_wbc_image):
    root = tmp_path / "AML-Cytomorphology_LMU"
    write_wbc_image(root / "BAS" / "BAS_0001.tiff", seed=1)
    write_wbc_image(root / "MOB" / "MOB_0001.tiff", seed=2, mode="RGBA")
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    (root / "NGS").mkdir()
    Image.fromarray(ramp).save(root / "NGS" / "NGS_0001.tiff")
    assert Image.open(root / "NGS" / "NGS_0001.tiff").mode == "I;16"

    fmt, listing = read_records(tmp_path)  # the usual top folder is entered
    records = listing.records

    assert fmt == "matek"
    assert classes_of(records, root) == [("BAS/BAS_0001.tiff", "BAS"),
                                         ("MOB/MOB_0001.tiff", "MOB"),
                                         ("NGS/NGS_0001.tiff", "NGS")]
    loaded = load_images([r.path for r in records], 16, tmp_path / "cache")
    assert loaded.images.shape == (3, 16, 16, 3) and not loaded.unreadable
    grey = loaded.images[2].astype(int)
    assert (grey[..., 0] == grey[..., 2]).all()
    middle_row = grey[8, :, 0]
    assert middle_row[0] < 20 and middle_row[-1] > 235  # scaled by range, not clipped at 255
    assert abs(middle_row.mean() - 127) < 12
    munich = load_centre(CentreSpec("munich", tmp_path / "AML-Cytomorphology_LMU",
                                    taxonomy="wbc13"), 16, tmp_path / "cache")
    assert [munich.classes[i] for i in munich.labels] == ["basophil", "neutrophil_segmented"]
    assert munich.stats["dropped:MOB"] == 1


def test_generic_folder_converts_every_colour_mode(tmp_path, write_wbc_image):
    root = tmp_path / "cells"
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[5:15, 10:20] = (200, 0, 0, 255)  # an opaque red square, transparent elsewhere
    (root / "eosinophil").mkdir(parents=True)
    Image.fromarray(rgba).save(root / "eosinophil" / "transparent.png")
    write_wbc_image(root / "lymphocyte" / "palette.png", mode="P")
    write_wbc_image(root / "monocyte" / "wide.bmp", size=(60, 20))
    write_wbc_image(root / "neutrophil" / "cmyk.jpg", mode="CMYK")
    write_wbc_image(root / "neutrophil" / "grey.jpg", mode="L")

    fmt, listing = read_records(root)
    records = listing.records
    loaded = load_images([r.path for r in records], 24, tmp_path / "cache")

    assert fmt == "folder"
    assert [r.source_class for r in records] == ["eosinophil", "lymphocyte", "monocyte",
                                                 "neutrophil", "neutrophil"]
    assert loaded.images.shape == (5, 24, 24, 3) and loaded.images.dtype == np.uint8
    transparent, wide = loaded.images[0].astype(int), loaded.images[2].astype(int)
    assert (transparent[0, 0] == 255).all()  # composited on white
    assert np.abs(transparent[12, 12] - (200, 0, 0)).max() < 20
    assert np.abs(wide[0, 0] - wide[12, 0]).max() < 6  # padded with the background colour
    dark_rows, dark_cols = np.nonzero(wide.mean(axis=-1) < 150)
    assert abs(np.ptp(dark_rows) - np.ptp(dark_cols)) <= 1  # the disc stays round


def test_raabin_pools_its_splits_and_ignores_folder_case(tmp_path, write_wbc_image):
    for seed, (split, name) in enumerate([("Train", "Neutrophil"), ("Train", "basophil"),
                                          ("TestA", "Lymphocyte"), ("TestB", "MONOCYTE")]):
        write_wbc_image(tmp_path / split / name / f"{seed}.jpg", seed=seed)

    fmt, listing = read_records(tmp_path)
    records = listing.records

    assert fmt == "raabin"
    assert [map_label(fmt, r.source_class, "wbc5") for r in records] == [
        "neutrophil", "basophil", "lymphocyte", "monocyte"]


def test_pbc_prefixes_split_immature_granulocytes_and_neutrophils(tmp_path, write_wbc_image):
    root = tmp_path / "PBC_dataset_normal_DIB"
    names = {"neutrophil": ["BNE_2.jpg", "NEUTROPHIL_3.jpg", "SNE_1.jpg"],
             "ig": ["IG_7.jpg", "MMY_5.jpg", "MY_4.jpg", "PMY_6.jpg"],
             "platelet": ["PLATELET_8.jpg"]}
    for folder, files in names.items():
        for seed, name in enumerate(files):
            write_wbc_image(root / folder / name, seed=seed)
    (root / "neutrophil" / ".DS_9.jpg").write_bytes(b"\x00\x05\x16\x07 macOS metadata")

    fmt, listing = read_records(root)
    records = listing.records

    assert fmt == "pbc"
    assert classes_of(records, root) == [
        ("ig/IG_7.jpg", "ig/IG"), ("ig/MMY_5.jpg", "ig/MMY"), ("ig/MY_4.jpg", "ig/MY"),
        ("ig/PMY_6.jpg", "ig/PMY"), ("neutrophil/.DS_9.jpg", "neutrophil"),
        ("neutrophil/BNE_2.jpg", "neutrophil/BNE"),
        ("neutrophil/NEUTROPHIL_3.jpg", "neutrophil/NEUTROPHIL"),
        ("neutrophil/SNE_1.jpg", "neutrophil/SNE"), ("platelet/PLATELET_8.jpg", "platelet")]


def test_lower_case_folders_without_pbc_file_names_are_generic(tmp_path, write_wbc_image):
    write_wbc_image(tmp_path / "neutrophil" / "cell one.png")
    assert detect_format(tmp_path) == "folder"


def test_zheng_reads_any_dataset_number_and_skips_masks(tmp_path, write_wbc_image):
    root = tmp_path / "segmentation_WBC"
    for i in range(1, 5):
        write_wbc_image(root / "Dataset 2" / f"{i:03d}.bmp", seed=i)
        write_wbc_image(root / "Dataset 2" / f"{i:03d}.png", seed=i, mode="L")  # a mask
    (root / "Class Labels of Dataset 2.csv").write_bytes(
        b"image ID,class label\r\n1,1\r\n2,5\r\n3,2\r\n4,4\r\n5,3\r\n")

    fmt, listing = read_records(root)
    records = listing.records
    loaded = load_images([r.path for r in records], 16, tmp_path / "cache")

    assert fmt == "zheng"
    assert classes_of(records, root) == [("Dataset 2/001.bmp", "1"), ("Dataset 2/002.bmp", "5"),
                                         ("Dataset 2/003.bmp", "2"), ("Dataset 2/004.bmp", "4"),
                                         ("Dataset 2/005.bmp", "3")]
    assert [p.name for p in loaded.unreadable] == ["005.bmp"]  # listed but absent


def test_manifest_groups_patients_and_byte_identical_files(tmp_path, write_wbc_image):
    images = tmp_path / "images"
    for seed in range(6):
        write_wbc_image(images / f"{seed}.png", seed=seed)
    (images / "again.png").write_bytes((images / "5.png").read_bytes())
    manifest = tmp_path / "lists" / "site.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label,patient\n"
                        "../images/0.png,neutrophil,p1\n../images/1.png,monocyte,p1\n"
                        "../images/2.png,lymphocyte,p2\n../images/3.png,basophil,\n"
                        f"{images / '4.png'},eosinophil,\n"
                        "../images/5.png,eosinophil,p3\n../images/again.png,eosinophil,p4\n")

    assert detect_format(manifest) == "manifest"
    data = load_centre(CentreSpec("site", manifest), 16, tmp_path / "cache")

    groups = data.groups.tolist()
    assert len(data) == 7 and data.stats["duplicates"] == 1
    assert groups[0] == groups[1]  # patient p1
    assert groups[5] == groups[6]  # byte-identical files join patients p3 and p4
    assert len(set(groups)) == 5


ZHENG_ROWS = [(1, "1"), (2, "5"), (3, "2")]


@pytest.mark.parametrize(("body", "used"), [
    (b"image ID,class label\r\n1,1\r\n2,5\r\n3,2\r\n",  # Dataset 1, as published
     "image ID = 'image ID', class label = 'class label' (by name, comma-separated)"),
    (b"image ID,class\n1,1\n2,5\n3,2\n",  # Dataset 2, as published
     "image ID = 'image ID', class label = 'class' (by name, comma-separated)"),
    ("\ufeffClass ; Image-ID\n1;1\n\n5;002\n2;3.bmp\n".encode(),  # Excel: BOM, reordered
     "image ID = 'Image-ID', class label = 'Class' (by name, semicolon-separated)"),
    (b"Bild\tKlasse\n1\t1\n2\t5\n3\t2\n",  # two columns named in no known way
     "image ID = 'Bild', class label = 'Klasse' (by position, tab-separated)"),
    (b"1,1\n2,5\n3,2\n",  # no header row at all
     "image ID = 'column 1', class label = 'column 2' (by position, no header row"),
])
def test_zheng_label_file_variants(tmp_path, write_wbc_image, body, used):
    root = tmp_path / "segmentation_WBC"
    for i in range(1, 4):
        write_wbc_image(root / "Dataset 1" / f"{i:03d}.bmp", seed=i)
    (root / "Class Labels of Dataset 1.csv").write_bytes(body)

    fmt, listing = read_records(root)

    assert fmt == "zheng"
    assert classes_of(listing.records, root) == [(f"Dataset 1/{i:03d}.bmp", code)
                                                 for i, code in ZHENG_ROWS]
    [note] = listing.notes
    assert note.startswith(f"Class Labels of Dataset 1.csv: {used}")
    report = inspect_source(root)
    assert report["label_files"] == list(listing.notes)
    assert report["target_counts"]["basophil"] == 1


@pytest.mark.parametrize(("body", "message"), [
    ("image ID,class label\n1,1\nseven,2\n",
     r"Dataset 1\.csv line 3: expected a numeric image ID and a class code, got 'seven'"),
    ("image ID,class label\n1,1\n2\n",
     r"line 3: expected at least 2 comma-separated columns \(image ID, class label\), got 1"),
    ("number;stain;label\n1;MGG;1\n",
     r"line 1: no column for 'image ID'; expected a header naming 'image ID' \(image_id, id, "
     r"image, \.\.\.\) and 'class label'.*found 3: number, stain, label"),
    ("", r"Dataset 1\.csv: empty; expected a header row"),
])
def test_a_label_file_that_cannot_be_read_names_its_line(tmp_path, write_wbc_image, body,
                                                         message):
    root = tmp_path / "segmentation_WBC"
    write_wbc_image(root / "Dataset 1" / "001.bmp")
    (root / "Class Labels of Dataset 1.csv").write_text(body)
    with pytest.raises(ValueError, match=message):
        read_records(root)


@pytest.mark.parametrize(("name", "body", "used"), [
    ("site.csv", "Class;File name;Patient ID\nmonocyte;a.png;p1\nbasophil;b.png;p1\n",
     "path = 'File name', label = 'Class', patient = 'Patient ID' (by name, semicolon"),
    ("site.csv", "filename\tlabel\tcenter\na.png\tmonocyte\tnorth\nb.png\tbasophil\tnorth\n",
     "path = 'filename', label = 'label', centre = 'center' (by name, tab"),
    ("site.csv", "a.png,monocyte\nb.png,basophil\n",
     "path = 'column 1', label = 'column 2' (by position, no header row"),
])
def test_manifest_columns_by_name_variant_or_position(tmp_path, write_wbc_image, name, body,
                                                      used):
    for seed, file in enumerate(("a.png", "b.png")):
        write_wbc_image(tmp_path / file, seed=seed)
    (tmp_path / name).write_text(body)

    fmt, listing = read_records(tmp_path / name)

    assert fmt == "manifest"
    assert [(r.path.name, r.source_class) for r in listing.records] == [
        ("a.png", "monocyte"), ("b.png", "basophil")]
    assert used in listing.notes[0]


def test_manifest_without_path_and_label_columns_is_refused(tmp_path):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("slide,stain,reader\n1,MGG,A\n")
    with pytest.raises(ValueError, match=r"bad\.csv line 1: no column for 'path'.*'label'"):
        read_records(manifest)


def test_corrupt_files_are_skipped_counted_and_listed(wbc_class_folders, tmp_path):
    report = inspect_source(wbc_class_folders)
    assert report["format"] == "folder"
    assert report["unreadable"] == ["neutrophil/broken.jpg"]
    assert report["readable"] == 23 and report["files"] == 24
    assert report["target_counts"] == {"neutrophil": 4, "lymphocyte": 4, "monocyte": 4,
                                       "eosinophil": 5, "basophil": 4}
    assert report["dropped_counts"] == {"folder:platelet": 2}
    assert report["duplicates"]["files"] == [["eosinophil/copy_of_eosinophil_0.jpg",
                                              "eosinophil/eosinophil_0.jpg"]]
    assert report["image_size"]["width"] == {"min": 40, "median": 40.0, "max": 40}


def test_unknown_layout_names_the_path_and_the_known_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("no class folders here")
    with pytest.raises(ValueError) as error:
        detect_format(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert all(name in str(error.value) for name in SOURCE_FORMATS)
    with pytest.raises(FileNotFoundError, match="missing"):
        detect_format(tmp_path / "missing")
    with pytest.raises(ValueError, match="expects a CSV file"):
        read_records(tmp_path, "manifest")
