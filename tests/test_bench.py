"""`cytofed bench` in a tiny CPU configuration: the figures are printed and sane."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.centres import read_centre
from common.config import RunConfig
from simulations.bench import round_timing
from simulations.bench_peer import centre_files, peer_transform
from simulations.cli import main

TINY = ["bench", "--device", "cpu", "--model", "test_resnet", "--image-size", "32",
        "--batch-size", "8", "--steps", "4", "--repeats", "3"]


def assert_sane(result: dict) -> None:
    """Figures (a), (b), (c) and (e) of a bench result."""
    assert result["ceiling_images_per_second"] > 0
    assert result["pipeline_images_per_second"] > 0
    assert 0 < result["ratio"] <= 1.5, (result["ceiling_blocks"], result["pipeline_blocks"])
    assert result["ratio"] == pytest.approx(
        result["pipeline_images_per_second"] / result["ceiling_images_per_second"])
    wire = result["wire_bytes"]
    assert set(wire) == {"fp32", "bf16", "fp16"}
    assert wire["bf16"] == wire["fp16"]
    assert wire["bf16"] / wire["fp32"] == pytest.approx(0.5, abs=0.01)


def assert_sane_peer(result: dict, repeats: int) -> None:
    """Figure (f) of a bench result: the peer measured in the same run as (b)."""
    peer = result["peer"]
    assert peer["images_per_second"] > 0
    assert len(peer["blocks"]) == repeats and peer["images_per_second"] == max(peer["blocks"])
    assert peer["speedup"] == pytest.approx(
        result["pipeline_images_per_second"] / peer["images_per_second"])
    assert peer["workers"] == 1
    assert "torchvision transforms v2" in peer["pipeline"]


def test_bench_json_on_real_decoded_images_with_the_peer(tiny_centre, capsys):
    assert main([*TINY, *tiny_centre, "--skip-flower", "--peer", "--peer-workers", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert_sane(result)
    assert_sane_peer(result, repeats=3)
    assert result["peer"]["files"] == "the centre's original image files"
    assert result["data"].startswith("tiny: ")
    assert "real decoded images" in result["data"]
    assert result["config"]["augment"] == "domain"
    assert result["flower"] is None


def test_bench_table_names_every_figure(tiny_centre, capsys):
    assert main([*TINY, *tiny_centre, "--skip-flower"]) == 0
    out = capsys.readouterr().out
    for figure in ("(a) model-only ceiling", "(b) local-training pipeline",
                   "(c) pipeline / ceiling", "(d) Flower round overhead    skipped",
                   "(e) bytes per client/round"):
        assert figure in out
    assert "(f)" not in out  # the peer only with --peer


def test_missing_real_data_falls_back_to_synthetic_also_for_the_peer(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setenv("CYTOFED_CACHE_DIR", str(tmp_path / "cache"))
    toml = tmp_path / "centre.toml"
    toml.write_text(f'name = "gone"\npath = "{tmp_path / "missing"}"\n')
    assert main([*TINY, "--data-source", str(toml), "--centre", "gone", "--skip-flower",
                 "--peer", "--peer-workers", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "synthetic images (real data missing" in result["data"]
    assert_sane(result)
    assert_sane_peer(result, repeats=3)
    assert result["peer"]["files"] == "the 600 synthetic images written as 32 px PNG files"


def test_peer_reads_the_files_cytofed_loads(tiny_centre, tmp_path):
    spec = read_centre(tmp_path / "centre.toml")
    paths, labels = centre_files(spec, RunConfig(image_size=32))
    assert len(paths) == len(labels) == 21  # the corrupt file and the platelets are left out
    assert not any(path.name == "broken.jpg" for path in paths)


def test_peer_transform_makes_normalised_model_inputs_from_any_image_size():
    transform = peer_transform(24)
    image = Image.fromarray(np.full((50, 37, 3), 200, np.uint8))
    batch = torch.stack([transform(image) for _ in range(8)])
    assert batch.shape == (8, 3, 24, 24) and batch.dtype == torch.float32
    assert batch.mean() > 0.5  # a bright image stays bright after ImageNet normalisation


def test_round_timing_takes_the_slowest_site_per_phase():
    timing = round_timing({"seconds": 10.0, "held_out_seconds": 1.0,
                           "clients": [{"train_seconds": 4.0}, {"train_seconds": 6.0}],
                           "site_eval_seconds": [0.5, 1.5]})
    assert timing == {"seconds": 10.0, "compute": 6.0 + 1.5 + 1.0,
                      "summed_site_compute": 12.0}
