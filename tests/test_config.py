"""A bad run config is refused with the field named; pyproject and RunConfig agree."""

import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig, parse_run_config, resolve_centres

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_the_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == RunConfig().to_dict()
    assert parse_run_config(table) == RunConfig()


@pytest.mark.parametrize(("key", "value", "field"), [
    ("model", "resnet_does_not_exist", "model"),
    ("learning-rate", -0.1, "learning-rate"),
    ("learning-rate", "fast", "learning-rate"),
    ("num-server-rounds", 0, "num-server-rounds"),
    ("num-server-rounds", 2.5, "num-server-rounds"),
    ("loss", "magic", "loss"),
    ("strategy", "fedmagic", "strategy"),
    ("augment", "flip,teleport", "augment"),
    ("image-size", 4, "image-size"),
    ("unknown-knob", 1, "unknown-knob"),
])
def test_bad_values_name_the_field(key, value, field):
    with pytest.raises(ConfigError, match=f"'{field}'") as error:
        parse_run_config({key: value})
    assert error.value.field_name == field


def test_integers_are_accepted_for_floats():
    assert parse_run_config({"learning-rate": 1}).learning_rate == 1.0


def test_held_out_centre_must_exist():
    with pytest.raises(ConfigError, match=r"'held-out'.*clinic-a"):
        resolve_centres(parse_run_config({"held-out": "atlantis"}))
    names = [c.name for c in resolve_centres(RunConfig())]
    assert "clinic-d" in names and len(names) == 4


def test_missing_centres_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'data-source'"):
        resolve_centres(parse_run_config({"data-source": str(tmp_path / "none.toml")}))


def test_every_registered_method_is_a_strategy_value():
    from common.methods import METHODS

    assert all(parse_run_config({"strategy": name}).strategy == name for name in METHODS)


def test_frozen_batchnorm_needs_a_pretrained_backbone():
    with pytest.raises(ConfigError, match=r"run config field 'norm'.*pretrained"):
        parse_run_config({"norm": "frozen_batch"})
    assert parse_run_config({"norm": "frozen_batch", "pretrained": "imagenet"}).norm == (
        "frozen_batch")
