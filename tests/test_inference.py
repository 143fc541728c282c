"""`cytofed evaluate` and `cytofed predict` on an exported model, without Flower."""

import csv
import json
from pathlib import Path

import pytest

from common.inference import evaluate_centre
from simulations.cli import main
from tests.exported_model import export_tiny_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data/wbc"
METRIC_KEYS = {"macro_f1", "balanced_accuracy", "per_class_f1", "confusion_matrix"}


@pytest.fixture
def model_dir(tmp_path):
    return export_tiny_model(tmp_path / "run")[1].parent


def test_predict_writes_one_row_per_readable_image_and_lists_the_unreadable(
        tmp_path, model_dir, write_wbc_image, capsys):
    images = tmp_path / "lab"
    for i, name in enumerate(["a.png", "b.jpg", "day2/c.tif"]):
        write_wbc_image(images / name, seed=i, size=(60, 44))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out" / "preds.csv"
    assert main(["predict", "--model", str(model_dir), "--images", str(images),
                 "--out", str(out)]) == 0
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == ["a.png", "b.jpg", "day2/c.tif"]
    classes = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
    for row in rows:
        probabilities = [float(row[f"p_{name}"]) for name in classes]
        assert sum(probabilities) == pytest.approx(1, abs=1e-3)
        assert row["predicted"] == classes[probabilities.index(max(probabilities))]
        assert row["uncertain"] == str(float(row["confidence"]) < 0.35)
    assert (tmp_path / "out" / "preds.unreadable.txt").read_text() == "broken.jpg\n"
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "predicting [" in captured.err
    assert "3 predictions" in captured.out and "1 unreadable" in captured.out


def test_evaluate_on_a_labelled_folder_centre(tmp_path, model_dir, wbc_class_folders):
    centre = tmp_path / "folders.toml"
    centre.write_text(f'name = "folders"\npath = "{wbc_class_folders}"\n')
    result = evaluate_centre(model_dir, centre, cache_dir=tmp_path / "cache")
    assert result.keys() >= METRIC_KEYS and result["centre"] == "folders"
    assert result["num_examples"] == 21  # 5 classes x 4 + a duplicate; platelets, corrupt out
    assert 0 <= result["uncertain"]["coverage"] <= 1


@pytest.mark.skipif(not (SHARED / "BCCD").is_dir(), reason=f"no shared data at {SHARED}")
def test_evaluate_on_shared_bccd_centre(tmp_path, model_dir, capsys):
    centre = tmp_path / "bccd.toml"
    centre.write_text(f'name = "bccd"\npath = "{SHARED / "BCCD"}"\nformat = "bccd"\n')
    assert main(["evaluate", "--model", str(model_dir / "model_card.json"), "--centre",
                 str(centre), "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result.keys() >= METRIC_KEYS
    assert any("macro_f1" in key for key in result)
    assert result["num_examples"] == 351
    assert sum(map(sum, result["confusion_matrix"])) == 351
    assert set(result["per_class_f1"]) == {"neutrophil", "lymphocyte", "monocyte",
                                           "eosinophil", "basophil"}
