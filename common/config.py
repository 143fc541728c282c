"""The run configuration: every knob, its default and its check, in one place.

Flower hands the ``[tool.flwr.app.config]`` table (plus ``--run-config`` overrides) to both
apps as a flat dict with hyphenated keys; :func:`parse_run_config` turns it into a validated
:class:`RunConfig` or raises :class:`ConfigError` naming the field, before any training starts.

``recipe`` names a flat TOML file of run-config keys (relative paths from the project root,
e.g. ``simulations/recipes/robust.toml``) loaded under the explicit keys: a key the run config
sets to something other than its default wins over the recipe's. (Flower hands the apps the
defaults merged with the overrides, and refuses a TOML file mixed with key-value pairs on one
``flwr run``, so a key given with its default value cannot be told from one left out: there,
the recipe's value is used.)
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.data import CentreSpec

FIELDS_OF_VIEW = ("full", "cell")
CLASS_PRIORS = ("local", "federated")
HELD_OUT_EVALUATIONS = ("server", "site")
SYNTHETIC = "synthetic"
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where relative recipe paths start


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""

    def __init__(self, field_name: str, expected: str, got: Any, source: str = "") -> None:
        where = f" (in {source})" if source else ""
        super().__init__(f"run config field '{field_name}'{where}: expected {expected}, "
                         f"got {got!r}")
        self.field_name = field_name


@dataclass(frozen=True)
class RunConfig:
    """Validated run configuration (attribute names are the run-config keys with underscores)."""

    num_server_rounds: int = 10
    local_epochs: int = 1
    local_steps: int = 0
    sampling_balance: float = 0.0
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    model: str = "resnet10t"
    pretrained: str = ""
    norm: str = "batch"
    image_size: int = 48
    loss: str = "ce"
    class_prior: str = "local"
    augment: str = "stain"
    field_of_view: str = "full"
    stain_normalise: str = "none"
    stain_sharing: bool = False
    restain_probability: float = 0.5
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    trim_fraction: float = 0.2
    min_train_nodes: int = 2
    max_site_images: int = 1_000_000
    max_update_norm: float = 1e5
    wire_precision: str = "fp32"
    average_last_rounds: int = 0
    held_out: str = "clinic-d"
    held_out_evaluation: str = "server"
    held_out_every: int = 1
    data_source: str = SYNTHETIC
    allow_synthetic: bool = False
    synthetic_images: int = 600
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs"
    cache_dir: str = ".cache/cytofed"
    run_name: str = "cytofed"
    compile: bool = False
    test_time_bn: bool = False
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    round_timeout: float = 3600.0
    recipe: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The configuration with hyphenated keys, as in pyproject.toml."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


def _one_of(options: Callable[[], list[str]] | tuple[str, ...]) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        return value in (options() if callable(options) else options)

    return check


def _known_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _known_loss(name: str) -> bool:
    from common.losses import available_losses

    return name in available_losses()


def _known_augmentation(spec: str) -> bool:
    from common.augment import build_augmenter

    try:
        build_augmenter(spec)
    except ValueError:
        return False
    return True


def _stain_normalisations() -> tuple[str, ...]:
    from common.model_input import STAIN_NORMALISATIONS

    return STAIN_NORMALISATIONS


def _methods() -> list[str]:
    from common.methods import METHODS

    return list(METHODS)


def _norms() -> tuple[str, ...]:
    from common.models import NORMALISATIONS

    return NORMALISATIONS


def _wire_precisions() -> tuple[str, ...]:
    from common.weights import WIRE_PRECISIONS

    return WIRE_PRECISIONS


# Field -> (check, what is expected, or a function that says it). Fields without an entry
# only need the right type.
CHECKS: dict[str, tuple[Callable[[Any], bool], str | Callable[[], str]]] = {
    "num_server_rounds": (_positive, "a positive integer"),
    "local_epochs": (_positive, "a positive integer"),
    "local_steps": (_non_negative, "an integer >= 0 (0: local-epochs epochs per round)"),
    "sampling_balance": (lambda v: 0 <= v <= 1, "a number in [0, 1] (0: instance sampling, "
                         "1: class-balanced)"),
    "learning_rate": (_positive, "a positive number"),
    "weight_decay": (_non_negative, "a number >= 0"),
    "batch_size": (_positive, "a positive integer"),
    "model": (_known_model, "a timm model name such as 'resnet18' or 'tf_efficientnet_lite0'"),
    "norm": (_one_of(_norms), "'batch', 'group' or 'frozen_batch'"),
    "image_size": (lambda v: 16 <= v <= 1024, "an integer between 16 and 1024"),
    "loss": (_known_loss, "a loss of common.losses.available_losses()"),
    "class_prior": (_one_of(CLASS_PRIORS), f"one of {CLASS_PRIORS}"),
    "augment": (_known_augmentation, "an augmentation preset or comma-separated op names"),
    "field_of_view": (_one_of(FIELDS_OF_VIEW), f"one of {FIELDS_OF_VIEW}"),
    "stain_normalise": (_one_of(_stain_normalisations),
                        lambda: f"one of {_stain_normalisations()}"),
    "restain_probability": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "strategy": (_one_of(_methods), lambda: f"one of the methods {_methods()}"),
    "proximal_mu": (_non_negative, "a number >= 0"),
    "server_learning_rate": (_positive, "a positive number"),
    "trim_fraction": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    "min_train_nodes": (_positive, "a positive integer"),
    "max_site_images": (_positive, "a positive integer"),
    "max_update_norm": (_positive, "a positive number"),
    "wire_precision": (lambda v: v in _wire_precisions(), "'fp32', 'bf16' or 'fp16'"),
    "average_last_rounds": (_non_negative, "an integer >= 0 (0 turns weight averaging off)"),
    "held_out_evaluation": (_one_of(HELD_OUT_EVALUATIONS), f"one of {HELD_OUT_EVALUATIONS}"),
    "held_out_every": (_positive, "a positive integer"),
    "synthetic_images": (lambda v: v >= 20, "an integer >= 20"),
    "device": (lambda v: v in ("auto", "cpu") or v.startswith("cuda"), "'auto', 'cpu' or 'cuda'"),
    "run_name": (lambda v: bool(v) and "/" not in v, "a non-empty name without '/'"),
    "dp_noise_multiplier": (_non_negative, "a number >= 0 (0 turns differential privacy off)"),
    "dp_clipping_norm": (_positive, "a positive number"),
    "dp_delta": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "round_timeout": (_positive, "a positive number of seconds"),
}


def _coerce(name: str, value: Any, kind: type, source: str = "") -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(name.replace("_", "-"), f"a value of type {kind.__name__}", value,
                          source)
    return value


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Validate a flat run-config mapping (hyphenated keys); unknown keys are errors.

    A ``recipe`` file's keys are merged in first (see the module docstring).
    """
    config = _validated(with_recipe(run_config))
    if config.norm == "frozen_batch" and not config.pretrained:
        raise ConfigError("norm", "'batch' or 'group' without a pretrained backbone "
                          "('frozen_batch' keeps pretrained BatchNorm statistics)", config.norm)
    if config.norm == "group" and config.pretrained:
        from common.models import GROUP_NORM_FROM_BATCH_NORM

        raise ConfigError("norm", "'batch' or 'frozen_batch' with a pretrained backbone "
                          f"({GROUP_NORM_FROM_BATCH_NORM})", config.norm)
    return config


def _validated(run_config: Mapping[str, Any], source: str = "") -> RunConfig:
    """Every key known, typed and in range; errors name ``source`` (a recipe file) if given."""
    known = {f.name: f for f in fields(RunConfig)}
    defaults = RunConfig()
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(key, f"one of the known fields {sorted(RunConfig().to_dict())}",
                              value, source)
        values[name] = _coerce(name, value, type(getattr(defaults, name)), source)
    config = dataclasses.replace(defaults, **values)
    for name, (check, expected) in CHECKS.items():
        if not check(getattr(config, name)):
            raise ConfigError(name.replace("_", "-"),
                              expected() if callable(expected) else expected,
                              getattr(config, name), source)
    return config


def recipe_path(recipe: str) -> Path:
    """A recipe's file: absolute, or relative to the project root."""
    path = Path(recipe).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def load_recipe(recipe: str) -> dict[str, Any]:
    """The run-config keys of a recipe file, each checked (errors name the file)."""
    path = recipe_path(recipe)
    if not path.is_file():
        raise ConfigError("recipe", f"a TOML file of run-config keys (relative paths start at "
                          f"{PROJECT_ROOT})", recipe)
    try:
        keys = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError("recipe", f"a valid TOML file ({error})", str(path)) from error
    for key, value in keys.items():
        if isinstance(value, dict | list) or key == "recipe":
            raise ConfigError(key, "a flat run-config key = value (no tables, lists or "
                              "nested recipe)", value, f"recipe {path}")
    _validated(keys, f"recipe {path}")
    return keys


def with_recipe(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``run_config`` with its recipe's keys where it leaves them at their defaults."""
    merged = dict(run_config)
    if not merged.get("recipe"):
        return merged
    if not isinstance(merged["recipe"], str):
        raise ConfigError("recipe", "a path to a TOML file", merged["recipe"])
    defaults = RunConfig().to_dict()
    for key, value in load_recipe(merged["recipe"]).items():
        if key not in merged or merged[key] == defaults[key]:
            merged[key] = value
    return merged


def resolve_centres(config: RunConfig, base_dir: Path | None = None) -> list[CentreSpec]:
    """The centres of the run: the synthetic clinics or those of a centres TOML file.

    Raises ConfigError when the held-out centre is not among them or too few remain to train.
    """
    if config.data_source == SYNTHETIC:
        from common.synthetic import default_clinics

        centres = [CentreSpec(name=c.name, format=SYNTHETIC, share_stain=True)
                   for c in default_clinics()]
    else:
        from common.centres import read_centres

        path = Path(config.data_source)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ConfigError("data-source", f"'{SYNTHETIC}' or an existing centres TOML file",
                              str(path))
        centres = read_centres(path)
    names = [c.name for c in centres]
    if config.held_out not in names:
        raise ConfigError("held-out", f"one of the centres {names}", config.held_out)
    if len(centres) - 1 < config.min_train_nodes:
        raise ConfigError("min-train-nodes", f"at most {len(centres) - 1} training centres",
                          config.min_train_nodes)
    return centres


def training_centres(config: RunConfig, centres: list[CentreSpec]) -> list[CentreSpec]:
    """Every centre but the held-out one, in file order (the simulation's partition order)."""
    return [c for c in centres if c.name != config.held_out]
