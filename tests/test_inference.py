"""`cytofed evaluate` and `cytofed predict` on an exported model, without Flower."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.calibration import apply_temperature
from common.centres import load_centre, read_centre
from common.imagecache import load_images
from common.inference import evaluate_centre, predict_folder
from common.metrics import expected_calibration_error
from common.modelcard import CARD_FILE, Preprocessing, write_model_card
from common.models import create_model
from common.stain import ReinhardNormaliser
from common.train import adapt_batchnorm, predict_probabilities
from common.weights import model_state, save_weights
from simulations.cli import main
from tests.conftest import wbc_pixels
from tests.exported_model import export_tiny_model, tiny_card

ROOT = Path(__file__).resolve().parents[1]

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


def write_folder(root: Path, count: int, distinct: int = 50) -> Path:
    """``count`` small PNG files in folders of 200, copies of ``distinct`` encoded cells."""
    encoded = []
    for seed in range(distinct):
        buffer = io.BytesIO()
        Image.fromarray(wbc_pixels(seed, (40, 32))).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    for i in range(count):
        folder = root / f"d{i // 200:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(encoded[i % distinct])
    return root


PEAK_RSS = """
import json, resource, sys
from pathlib import Path
from common.inference import predict_folder
model, small, large, out = map(Path, sys.argv[1:5])
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
predict_folder(model, small, out / "small.csv", device="cpu")
before = peak()
summary = predict_folder(model, large, out / "large.csv", device="cpu")
print(json.dumps({"growth": peak() - before, "predictions": summary["predictions"]}))
"""


def test_predict_streams_so_memory_does_not_grow_with_the_folder(tmp_path):
    """Peak RSS of one process predicting 512 images, then 20,000 (16 px: 15 MB of decoded
    images, which the whole-folder version held twice and grew by ~40 MB)."""
    export_tiny_model(tmp_path / "model", preprocessing=Preprocessing(image_size=16))
    small = write_folder(tmp_path / "small", 512)
    large = write_folder(tmp_path / "large", 20_000)
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(tmp_path / "model"), str(small), str(large),
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured["predictions"] == 20_000
    assert measured["growth"] < 12 * 2**20, measured
    with (tmp_path / "large.csv").open() as handle:
        assert sum(1 for _ in handle) == 20_001


def predicted_probabilities(path: Path) -> tuple[list[dict], np.ndarray]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return rows, np.array([[float(r[f"p_{c}"]) for c in tiny_card().classes] for r in rows])


def test_streamed_batchnorm_adaptation_equals_adapting_on_the_whole_folder(tmp_path):
    model, card_path = export_tiny_model(tmp_path / "model", adapt_batchnorm=True)
    images = write_folder(tmp_path / "lab", 600, distinct=600)
    summary = predict_folder(card_path, images, tmp_path / "preds.csv", device="cpu",
                             adapt=True)
    assert summary["bn_adapted"] and summary["adapted_on"] == 600 and summary["hint"] is None
    rows, streamed = predicted_probabilities(tmp_path / "preds.csv")
    paths = sorted(images.rglob("*.png"))
    assert [r["file"] for r in rows] == [p.relative_to(images).as_posix() for p in paths]
    assert {r["bn_adapted"] for r in rows} == {"True"}
    loaded = load_images(paths, 32, tmp_path / "cache")
    device, inputs = torch.device("cpu"), tiny_card().preprocessing.model_input()
    adapt_batchnorm(model, torch.from_numpy(loaded.images), device, inputs)
    expected = predict_probabilities(model, torch.from_numpy(loaded.images), device, inputs)
    np.testing.assert_allclose(streamed, expected, atol=1e-4)


def test_without_adapt_nothing_is_adapted_whatever_the_card_says(tmp_path, capsys):
    model, card_path = export_tiny_model(tmp_path / "model", adapt_batchnorm=True)
    images = write_folder(tmp_path / "lab", 40, distinct=40)
    assert main(["predict", "--model", str(card_path), "--images", str(images),
                 "--out", str(tmp_path / "plain.csv")]) == 0
    output = capsys.readouterr().out
    assert "no BatchNorm adaptation" in output and "add --adapt" in output
    rows, plain = predicted_probabilities(tmp_path / "plain.csv")
    assert {r["bn_adapted"] for r in rows} == {"False"}
    loaded = load_images(sorted(images.rglob("*.png")), 32, tmp_path / "cache")
    device, inputs = torch.device("cpu"), tiny_card().preprocessing.model_input()
    expected = predict_probabilities(model, torch.from_numpy(loaded.images), device, inputs)
    np.testing.assert_allclose(plain, expected, atol=1e-4)
    assert main(["predict", "--model", str(card_path), "--images", str(images),
                 "--out", str(tmp_path / "adapted.csv"), "--adapt"]) == 0
    output = capsys.readouterr().out
    assert "BatchNorm statistics adapted on the folder's 40 images (--adapt)" in output
    assert "hint" not in output
    assert not np.allclose(predicted_probabilities(tmp_path / "adapted.csv")[1], plain,
                           atol=1e-3)


def test_evaluate_reports_adapted_metrics_apart_from_plain_ones(tmp_path, model_dir,
                                                                 wbc_class_folders, capsys):
    centre = tmp_path / "folders.toml"
    centre.write_text(f'name = "folders"\npath = "{wbc_class_folders}"\n')
    plain = evaluate_centre(model_dir, centre, cache_dir=tmp_path / "cache")
    both = evaluate_centre(model_dir, centre, cache_dir=tmp_path / "cache", adapt=True)
    assert "bn_adapted" not in plain
    assert {k: v for k, v in both.items() if k != "bn_adapted"} == plain
    adapted = both["bn_adapted"]
    assert adapted["adapted_on"] == 21 and adapted.keys() >= METRIC_KEYS
    assert adapted["loss"] != pytest.approx(plain["loss"])
    assert main(["evaluate", "--model", str(model_dir), "--centre", str(centre), "--adapt",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    assert text.index("plain (no adaptation):") < text.index(
        "after test-time BatchNorm adaptation on the centre's 21 unlabelled images (--adapt):")


def test_adapt_refuses_a_model_without_batchnorm(tmp_path, capsys):
    directory = tmp_path / "group"
    directory.mkdir()
    card = tiny_card(norm="group")
    model = create_model("test_resnet", len(card.classes), norm="group")
    save_weights(directory / card.weights, model_state(model))
    write_model_card(directory / CARD_FILE, card)
    assert main(["predict", "--model", str(directory), "--images", str(tmp_path),
                 "--out", str(tmp_path / "p.csv"), "--adapt"]) == 2
    assert "--adapt: model" in capsys.readouterr().err


def test_the_cards_temperature_and_input_are_applied(tmp_path, wbc_class_folders):
    """Every probability of ``predict`` and ``evaluate`` is softmax(logits / T) of the model
    fed the card's stain-normalised input at the card's mean/std."""
    preprocessing = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                  stain_normalisation="reinhard")
    model, card_path = export_tiny_model(tmp_path / "model", temperature=2.5,
                                         preprocessing=preprocessing)
    images = write_folder(tmp_path / "lab", 30, distinct=30)
    summary = predict_folder(card_path, images, tmp_path / "preds.csv", device="cpu")
    assert summary["temperature"] == 2.5
    loaded = load_images(sorted(images.rglob("*.png")), 32, tmp_path / "cache")
    normalised = ReinhardNormaliser()(torch.from_numpy(loaded.images))
    with torch.no_grad():
        logits = model((normalised.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5).numpy()
    np.testing.assert_allclose(predicted_probabilities(tmp_path / "preds.csv")[1],
                               apply_temperature(logits, 2.5), atol=1e-4)
    centre = tmp_path / "folders.toml"
    centre.write_text(f'name = "folders"\npath = "{wbc_class_folders}"\n')
    result = evaluate_centre(card_path, centre, cache_dir=tmp_path / "cache")
    data = load_centre(read_centre(centre), 32, tmp_path / "cache")
    normalised = ReinhardNormaliser()(torch.from_numpy(data.images))
    with torch.no_grad():
        logits = model((normalised.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5).numpy()
    assert result["temperature"] == 2.5 and result["stain_normalisation"] == "reinhard"
    assert result["ece"] == pytest.approx(
        expected_calibration_error(data.labels, apply_temperature(logits, 2.5)), abs=1e-6)
    assert result["ece"] != pytest.approx(
        expected_calibration_error(data.labels, apply_temperature(logits, 1.0)), abs=1e-4)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("given", ["missing", "empty-folder", "lonely.safetensors"])
def test_model_errors_name_the_path_the_user_gave(tmp_path, capsys, command, given):
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "lonely.safetensors").write_bytes(b"")
    model = tmp_path / given
    extra = (["--images", str(tmp_path), "--out", str(tmp_path / "p.csv")]
             if command == "predict" else ["--centre", str(tmp_path / "c.toml")])
    assert main([command, "--model", str(model), *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"cytofed {command}: error: model {model}")
    assert "model_card.json does not exist" not in error
