"""`cytofed bench` with its Flower figure: a real simulation, every figure printed and sane."""

import json

import pytest

from simulations.cli import main
from tests.test_bench import TINY, assert_sane

pytestmark = pytest.mark.integration


def test_bench_prints_all_five_figures(tiny_centre, capsys):
    flower = "num-server-rounds=2 model='test_resnet' image-size=32 synthetic-images=60"
    assert main([*TINY, *tiny_centre, "--flower-config", flower, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert_sane(result)
    figure = result["flower"]
    assert figure["rounds"] == 2 and figure["sites"] == 3
    assert 0 < figure["critical_path_compute_seconds"] < figure["round_seconds"]
    assert 0 < figure["overhead_ratio"] < 1
    assert figure["summed_site_compute_seconds"] > 0
    assert figure["update_bytes"] > 0
    assert 0 <= figure["held_out_macro_f1"] <= 1
