"""Smoke test of the stain benchmark script on synthetic clinics (timings are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from simulations.bench_stain import main


def test_bench_reports_every_op_and_draws_the_figure(tmp_path: Path, capsys) -> None:
    figure = tmp_path / "stain.png"
    assert main(["--synthetic", "--size", "32", "--batch", "4", "--model", "resnet10t",
                 "--steps", "1", "--repeats", "1", "--figure", str(figure), "--json",
                 "--threads", str(torch.get_num_threads())]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == "synthetic clinics"
    ratios = result["ratio_to_model_step"]
    assert ratios["model step (forward + backward + AdamW)"] == 1.0
    assert {"reinhard normalisation", "re-staining, reinhard", "re-staining, macenko",
            "hed_strong"} <= set(ratios)
    assert all(value > 0 for value in result["cpu_seconds_per_batch"].values())
    assert figure.stat().st_size > 10_000
