"""Centre TOML files, loading a centre through the cache, and ``cytofed data inspect``."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from common import imagecache
from common.centres import group_ids, load_centre, read_centre, read_centres
from common.data import CentreSpec, split_indices
from common.inspect import inspect_source
from common.taxonomy import TAXONOMIES
from simulations.cli import main

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def refuse_to_decode(*args, **kwargs):
    raise AssertionError("decoded although the cache holds the image")


def test_centre_file_with_defaults_and_a_path_relative_to_it(tmp_path):
    spec = read_centre(write(tmp_path / "sites" / "a.toml", 'name = "a"\npath = "../data"\n'))
    assert spec == CentreSpec(name="a", path=tmp_path / "sites" / ".." / "data")
    full = read_centre(write(tmp_path / "b.toml", 'name = "b"\npath = "x"\nformat = "pbc"\n'
                             'taxonomy = "wbc13"\nsplit_seed = 3\nshare_counts = false\n'
                             'share_stain = true\n'))
    assert (full.format, full.taxonomy, full.split_seed, full.share_counts) == (
        "pbc", "wbc13", 3, False)
    assert full.share_stain and not spec.share_stain  # stain statistics: shared only if allowed


@pytest.mark.parametrize(("body", "message"), [
    ('name = "a"\npath = "x"\npth = "y"\n', "unknown key 'pth'"),
    ('name = "a"\npath = "x"\nsplit_seed = "0"\n', "field 'split_seed' must be an integer"),
    ('name = "a"\npath = "x"\nsplit_seed = true\n', "field 'split_seed' must be an integer"),
    ('name = "a"\npath = 3\n', "field 'path' must be a string"),
    ('name = "a"\npath = "x"\nshare_stain = "yes"\n', "field 'share_stain' must be true or"),
    ('name = "a"\n', "field 'path' is missing"),
    ('path = "x"\n', "field 'name' is missing"),
    ('name = "a"\npath = "x"\ntaxonomy = "wbc7"\n', "field 'taxonomy' is 'wbc7'"),
    ('name = "a"\npath = "x"\nformat = "tiff"\n', "field 'format' is 'tiff'"),
    ('name = "a"\nformat = "synthetic"\ntaxonomy = "wbc13"\n', "taxonomy 'wbc5'"),
    ('name = "a\n', "not valid TOML"),
])
def test_centre_file_errors_name_the_file_and_the_field(tmp_path, body, message):
    path = write(tmp_path / "site.toml", body)
    with pytest.raises(ValueError, match=message) as error:
        read_centre(path)
    assert str(path) in str(error.value)


def test_centres_file_lists_centres_and_rejects_repeated_names(tmp_path):
    path = write(tmp_path / "centres.toml", '[[centre]]\nname = "a"\npath = "a"\n\n'
                 '[[centre]]\nname = "b"\nformat = "synthetic"\n')
    assert [(c.name, c.path) for c in read_centres(path)] == [("a", tmp_path / "a"), ("b", None)]
    with pytest.raises(ValueError, match=r"centres\.toml: holds a \[\[centre\]\] list"):
        read_centre(path)
    bad = write(tmp_path / "bad.toml", '[[centre]]\nname = "a"\npath = "a"\n\n'
                '[[centre]]\nname = "a"\npath = "b"\nseed = 1\n')
    with pytest.raises(ValueError, match=r"bad\.toml: \[\[centre\]\] #2: unknown key 'seed'"):
        read_centres(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.toml"):
        read_centres(tmp_path / "missing.toml")


def test_shipped_centres_point_at_the_shared_data():
    centres = read_centres(REPO / "simulations" / "centres" / "shared-wbc.toml")
    shared = REPO.parent / "shared" / "data" / "wbc"
    assert [(c.name, c.format, c.path.resolve()) for c in centres] == [
        ("barcelona", "pbc", (shared / "PBC_dataset_normal_DIB").resolve()),
        ("jiangxi", "zheng", (shared / "segmentation_WBC").resolve()),
        ("bccd", "bccd", (shared / "BCCD").resolve())]
    assert all(c.share_stain for c in centres)  # public data: stain statistics may be shared


def test_second_load_is_served_from_the_cache(wbc_class_folders, tmp_path, monkeypatch):
    spec = CentreSpec("clinic", wbc_class_folders, format="auto")
    first = load_centre(spec, 16, tmp_path / "cache")
    monkeypatch.setattr(imagecache, "decode_image", refuse_to_decode)
    second = load_centre(spec, 16, tmp_path / "cache")

    np.testing.assert_array_equal(first.images, second.images)
    assert second.classes == TAXONOMIES["wbc5"]
    assert second.class_counts().tolist() == [4, 4, 4, 5, 4]
    assert second.stats == {"unreadable": 1, "duplicates": 1, "dropped:platelet": 2}
    assert len(np.unique(second.groups)) == len(second) - 1


def test_duplicates_never_straddle_splits(wbc_class_folders, tmp_path):
    for i in range(12):  # enough eosinophil groups that every split gets some
        (wbc_class_folders / "eosinophil" / f"dup_{i}.jpg").write_bytes(
            (wbc_class_folders / "eosinophil" / f"eosinophil_{i % 4}.jpg").read_bytes())
    data = load_centre(CentreSpec("clinic", wbc_class_folders), 16, tmp_path / "cache")
    assert data.stats["duplicates"] == 13
    for seed in range(20):
        splits = split_indices(data.labels, data.groups, seed)
        split_groups = [set(data.groups[index].tolist()) for index in splits.values()]
        assert sum(len(s) for s in split_groups) == len(set().union(*split_groups))


def test_group_ids_join_content_and_patients():
    assert group_ids(["a", "b", "a", "c", "d"], [None, "p", None, "p", "q"]).tolist() == [
        0, 1, 0, 1, 2]
    assert group_ids(["a", "b", "a"], ["p", "q", "q"]).tolist() == [0, 0, 0]


def test_manifest_centre_column_selects_rows(tmp_path, write_wbc_image):
    for i in range(3):
        write_wbc_image(tmp_path / f"{i}.png", seed=i)
    manifest = write(tmp_path / "all.csv", "path,label,centre\n0.png,monocyte,north\n"
                     "1.png,basophil,south\n2.png,basophil,south\n")
    south = load_centre(CentreSpec("south", manifest), 16, tmp_path / "cache")
    assert south.class_counts().tolist() == [0, 0, 0, 0, 2]
    assert inspect_source(manifest)["centre_files"] == {"north": 1, "south": 2}
    with pytest.raises(ValueError, match=r"'east'.*north, south"):
        load_centre(CentreSpec("east", manifest), 16, tmp_path / "cache")


def test_unusable_data_is_refused_naming_the_centre_and_path(tmp_path, write_wbc_image):
    with pytest.raises(FileNotFoundError, match=r"centre 'site'.*nowhere.*does not exist"):
        load_centre(CentreSpec("site", tmp_path / "nowhere"), 16, tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"centre 'site'.*empty.*no known layout"):
        load_centre(CentreSpec("site", tmp_path / "empty"), 16, tmp_path / "cache")
    write_wbc_image(tmp_path / "platelets" / "platelet" / "1.png")
    with pytest.raises(ValueError, match=r"centre 'site'.*platelets.*maps to a wbc5 class"):
        load_centre(CentreSpec("site", tmp_path / "platelets"), 16, tmp_path / "cache")
    (tmp_path / "broken" / "basophil").mkdir(parents=True)
    (tmp_path / "broken" / "basophil" / "1.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"centre 'site'.*none of the 1 image files"):
        load_centre(CentreSpec("site", tmp_path / "broken"), 16, tmp_path / "cache")


def test_synthetic_centres_come_from_the_generator(tmp_path, monkeypatch):
    def load_clinic(name, image_size, cache_dir, n_images=600, seed=0):
        labels = np.arange(n_images) % 5
        return np.zeros((n_images, image_size, image_size, 3), np.uint8), labels

    fake = types.ModuleType("common.synthetic")
    fake.load_clinic = load_clinic
    monkeypatch.setitem(sys.modules, "common.synthetic", fake)
    data = load_centre(CentreSpec("clinic-a", format="synthetic"), 8, tmp_path,
                       synthetic_images=20)
    assert (len(data), data.classes, data.groups.tolist()) == (
        20, TAXONOMIES["wbc5"], list(range(20)))


def test_cli_inspect_prints_target_counts_as_json(wbc_class_folders, capsys):
    assert main(["data", "inspect", str(wbc_class_folders), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"eosinophil": 5' in out
    assert json.loads(out)["target_counts"]["neutrophil"] == 4
    assert main(["data", "inspect", str(wbc_class_folders), "--taxonomy", "wbc13"]) == 0
    assert "broken.jpg" in capsys.readouterr().out
    assert main(["data", "inspect", str(wbc_class_folders / "missing")]) == 2
    assert "cytofed data: error:" in capsys.readouterr().err


LAB_FOLDERS = {"Grans": 3, "Neutrófilos": 2, "Blasts": 2, "Artefacts": 1, "Lymphozyten": 2,
               "eosinophil": 2}
LAB_CENTRE = """name = "my-lab"
path = "wbc"
format = "folder"

[classes]
Grans = "neutrophil"
"Neutrófilos" = "neutrophil"
Blasts = "drop"
Promonocytes = "monocyte"
"""


def test_class_map_renames_drops_and_unknown_folders_are_reported(tmp_path, write_wbc_image,
                                                                   capsys, monkeypatch):
    for c, (folder, count) in enumerate(LAB_FOLDERS.items()):
        for i in range(count):
            write_wbc_image(tmp_path / "wbc" / folder / f"{i}.png", seed=10 * c + i)
    toml = write(tmp_path / "my-lab.toml", LAB_CENTRE)

    spec = read_centre(toml)
    data = load_centre(spec, 16, tmp_path / "cache")

    assert spec.class_map[0] == ("Grans", "neutrophil")
    assert dict(zip(data.classes, data.class_counts().tolist(), strict=True)) == {
        "neutrophil": 5, "lymphocyte": 2, "monocyte": 0, "eosinophil": 2, "basophil": 0}
    assert data.stats == {"unreadable": 0, "duplicates": 0, "dropped:Blasts": 2,
                          "unknown:Artefacts": 1}
    assert "1 images of class 'Artefacts' left out" in capsys.readouterr().err

    monkeypatch.setenv("CYTOFED_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["data", "inspect", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "== centre my-lab ==" in out
    assert "unknown classes, left out (name them in the centre file's [classes]): " \
           "'Artefacts' 1" in out
    assert "[classes] keys that match no source class: Promonocytes" in out
    assert "would train on 9 images (48 px, field of view full): neutrophil 5, lymphocyte 2" in out
    assert "load counts: unreadable 0, duplicates 0, dropped:Blasts 2, unknown:Artefacts 1" in out
    assert main(["data", "inspect", str(toml), "--json"]) == 0
    [centre] = json.loads(capsys.readouterr().out)["centres"]
    assert centre["loaded"]["stats"] == data.stats
    assert centre["source"]["classes"]["folder:Lymphozyten"] == {
        "target": "lymphocyte", "rule": "alias of lymphocyte"}
    assert main(["data", "inspect", str(toml), "--format", "pbc"]) == 2
    assert "sets its own format" in capsys.readouterr().err


@pytest.mark.parametrize(("body", "message"), [
    ('name = "a"\npath = "x"\n[classes]\nBaso = "basophils"\n',
     r"\[classes\]: class 'Baso' maps to 'basophils'; expected a wbc5 class"),
    ('name = "a"\npath = "x"\nclasses = "basophil"\n', "field 'classes' must be a table"),
    ('name = "a"\nformat = "synthetic"\n[classes]\nBaso = "basophil"\n',
     "synthetic centres have no source classes"),
])
def test_bad_class_maps_are_refused_naming_the_file(tmp_path, body, message):
    path = write(tmp_path / "site.toml", body)
    with pytest.raises(ValueError, match=message) as error:
        read_centre(path)
    assert str(path) in str(error.value)


def test_class_map_applies_to_coded_formats(tmp_path, write_wbc_image):
    root = tmp_path / "segmentation_WBC"
    for i in range(1, 4):
        write_wbc_image(root / "Dataset 1" / f"{i:03d}.bmp", seed=i)
    (root / "Class Labels of Dataset 1.csv").write_text("image ID,class\n1,1\n2,5\n3,9\n")
    toml = write(tmp_path / "zheng.toml", f'name = "z"\npath = "{root}"\n'
                 '[classes]\n5 = "drop"\n9 = "monocyte"\n')
    data = load_centre(read_centre(toml), 16, tmp_path / "cache")
    assert data.class_counts().tolist() == [1, 0, 1, 0, 0]
    assert data.stats["dropped:5"] == 1
