"""A bad run config is refused with the field named; pyproject and RunConfig agree."""

import re
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
    ("local-steps", -1, "local-steps"),
    ("sampling-balance", 1.5, "sampling-balance"),
    ("restain-probability", -0.1, "restain-probability"),
    ("stain-sharing", "yes", "stain-sharing"),
    ("average-last-rounds", -2, "average-last-rounds"),
    ("held-out-every", 0, "held-out-every"),
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
    assert all(c.share_stain for c in resolve_centres(RunConfig()))  # synthetic: may share


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


def write_recipe(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return str(path)


def test_a_recipe_is_loaded_under_the_explicit_keys(tmp_path):
    recipe = write_recipe(tmp_path, 'image-size = 96\naugment = "domain_strong"\n'
                                    "average-last-rounds = 3\n")
    config = parse_run_config({**RunConfig().to_dict(), "recipe": recipe, "augment": "basic"})
    assert (config.image_size, config.average_last_rounds) == (96, 3)  # from the recipe
    assert config.augment == "basic"  # explicit: wins
    assert config.recipe == recipe
    # Re-reading a parsed config gives the same config (a run's recorded config, for example).
    assert parse_run_config(config.to_dict()) == config


def test_the_shipped_recipe_resolves_from_the_project_root():
    config = parse_run_config({"recipe": "simulations/recipes/robust.toml"})
    assert (config.model, config.pretrained, config.image_size) == (
        "tf_efficientnet_lite0", "imagenet", 96)
    assert (config.field_of_view, config.augment) == ("cell", "domain_strong")
    assert config.local_steps > 0 and config.average_last_rounds > 0
    text = (ROOT / "simulations/recipes/robust.toml").read_text()
    assert "validation splits only" in text


@pytest.mark.parametrize(("text", "field", "message"), [
    ("magic-knob = 1\n", "magic-knob", "known fields"),
    ("image-size = 4\n", "image-size", "between 16 and 1024"),
    ("learning-rate = \"fast\"\n", "learning-rate", "type float"),
    ("[table]\nkey = 1\n", "table", "flat"),
    ('recipe = "other.toml"\n', "recipe", "nested"),
    ("image-size = = 3\n", "recipe", "valid TOML"),
])
def test_a_bad_recipe_is_refused_naming_the_file(tmp_path, text, field, message):
    recipe = write_recipe(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        parse_run_config({"recipe": recipe})
    assert error.value.field_name == field and "recipe.toml" in str(error.value)


def test_a_missing_recipe_is_refused():
    with pytest.raises(ConfigError, match=r"'recipe'.*TOML file"):
        parse_run_config({"recipe": "simulations/recipes/none.toml"})


def test_the_readme_documents_every_run_config_key_once():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("| key | meaning |"):]
    table = table[:table.index("\n\n")]
    documented = [key for row in table.splitlines()[2:]
                  for key in re.findall(r"`([a-z0-9-]+)`", row.split(" | ")[0])]
    assert sorted(documented) == sorted(RunConfig().to_dict())
