"""The LOCO sweep's plan, aggregation over seeds and tables (no training)."""

import argparse
import json
import os

import numpy as np
import pytest
import torch

from common.bootstrap import macro_f1_of_matrices
from common.config import RunConfig
from common.selection import SELECTION_KEY
from simulations.loco import (
    REFERENCE,
    Run,
    _recipe,
    parse_variants,
    plan,
    render_markdown,
    run_overrides,
    selected_results,
    share_cores,
    shell_join,
    summarise,
)

CLASSES = ("neutrophil", "basophil")
# Four confidence bins; the card's threshold 0.5 keeps the upper two: 8 right, 1 wrong of 13.
HISTOGRAM = {"correct": [0, 2, 3, 5], "wrong": [1, 1, 1, 0]}


def metrics(f1: float, basophil: float | None = 0.5, matrix: list | None = None) -> dict:
    extra = {"confusion_matrix": matrix, "confidence_histogram": HISTOGRAM} if matrix else {}
    return {"macro_f1": f1, "balanced_accuracy": f1 + 0.1,
            "per_class_f1": {"neutrophil": f1, "basophil": basophil}, **extra}


def test_plan_always_holds_pooled_cross_entropy():
    runs = plan(["a", "b"], ["fedavg"], ["focal"], seeds=2)
    assert len(runs) == 2 * 2 * 2
    assert {(r.method, r.loss) for r in runs} == {REFERENCE, ("fedavg", "focal")}
    assert len(plan(["a"], ["pooled"], ["ce"], seeds=1)) == 1


def test_the_reference_alone_takes_the_reference_overrides(tmp_path):
    recipe, reference = {"field-of-view": "cell", "augment": "domain"}, {"field-of-view": "full"}
    pooled = run_overrides(Run("a", "pooled", "ce", 1), recipe, reference, tmp_path)
    fedbn = run_overrides(Run("a", "fedbn", "ce", 1), recipe, reference, tmp_path)
    assert pooled["field-of-view"] == "full" and pooled["augment"] == "domain"
    assert pooled["strategy"] == "pooled"  # every method is a registry entry
    assert fedbn["field-of-view"] == "cell" and fedbn["strategy"] == "fedbn"
    assert (fedbn["held-out"], fedbn["seed"], fedbn["run-name"]) == ("a", 1, "a-fedbn-ce-s1")


def test_rows_average_over_seeds_and_local_models(tmp_path):
    def report(name: str, best: dict, centre: str = "x", model: dict | None = None,
               rounds: list | None = None) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"training_centres": [centre], "best": best,
                                    **({"model": model} if model else {}),
                                    **({"rounds": rounds} if rounds else {})}))
        return path

    results = []
    matrices = ([[8, 2], [1, 9]], [[6, 4], [3, 7]])
    for seed, (f1, matrix) in enumerate(zip((0.4, 0.6), matrices, strict=True)):
        run = Run("a", "fedbn", "ce", seed)
        rounds = [{"round": r, "validation": {SELECTION_KEY: 0.1 * r + 0.1 * seed}}
                  for r in (1, 7)]  # round 7 selected: 0.7 and 0.8 over the seeds
        reports = [report(run.name, {"round": 7, "held_out": metrics(f1, matrix=matrix),
                                     "held_out_bn_adapted": metrics(0.9),
                                     "in_distribution_test": metrics(0.95),
                                     "id_ood_gap": 0.05},
                          model={"uncertainty": {"threshold": 0.5}}, rounds=rounds)]
        results.append((run, selected_results(run, reports), reports))
    run = Run("a", "local", "ce", 0)
    reports = [report(f"local-{c}", {"held_out": metrics(f1, None), "held_out_bn_adapted": None},
                      c) for c, f1 in (("x", 0.2), ("y", 0.4))]  # an older report: no ID test
    results.append((run, selected_results(run, reports), reports))

    rows = {r["method"]: r for r in summarise(results)}
    assert set(rows) == {"fedbn", "local", "local:x", "local:y"}
    assert rows["fedbn"]["macro_f1_mean"] == pytest.approx(0.5)
    assert rows["fedbn"]["macro_f1_std"] == pytest.approx(0.1414, abs=1e-3)
    assert rows["fedbn"]["bn_adapted_macro_f1_mean"] == pytest.approx(0.9)
    assert rows["fedbn"]["seeds"] == 2 and len(rows["fedbn"]["run_dirs"]) == 1
    assert rows["fedbn"]["id_test_macro_f1_mean"] == pytest.approx(0.95)
    assert rows["fedbn"]["id_ood_gap_mean"] == pytest.approx(0.05)
    assert rows["local"]["id_test_macro_f1_mean"] is None
    assert rows["local"]["macro_f1_mean"] == pytest.approx(0.3)
    assert rows["local"]["per_class_f1"]["basophil"] is None
    assert rows["local"]["bn_adapted_macro_f1_mean"] is None
    # The seeds' held-out confusion matrices pooled, and their bootstrap interval.
    interval = rows["fedbn"]["macro_f1_interval"]
    pooled_f1 = float(macro_f1_of_matrices(np.array([[14, 6], [4, 16]])))
    assert interval["macro_f1"] == pytest.approx(pooled_f1) and interval["level"] == 0.95
    assert interval["low"] < pooled_f1 < interval["high"]
    assert rows["local"]["macro_f1_interval"] is None  # older reports: no matrix
    assert rows["fedbn"]["not_uncertain_share"] == pytest.approx(9 / 13)
    assert rows["fedbn"]["not_uncertain_accuracy"] == pytest.approx(8 / 9)
    assert rows["local"]["not_uncertain_share"] is None
    # Seeds' histograms summed: correct [0, 4, 6, 10], wrong [2, 2, 2, 0]; only the top bin
    # errs at most 5%, so 10 of 26 predictions can be kept at that accuracy.
    assert rows["fedbn"]["accurate_share_oracle"] == pytest.approx(10 / 26)
    assert rows["local"]["accurate_share_oracle"] is None
    assert rows["fedbn"]["selection_score_mean"] == pytest.approx(0.75)
    assert rows["local"]["selection_score_mean"] is None  # no per-round validation recorded

    header = {"command": "cytofed loco ...", "machine": "CPU", "date": "today",
              "selection": "validation", "recipe": {}, "reference": {}}
    other_centre = [{**r, "held_out": "b"} for r in rows.values() if ":" not in r["method"]]
    markdown = render_markdown(header, [*rows.values(), *other_centre])
    assert "## Held-out centre: a" in markdown and "F1 basophil" in markdown
    low, high = (f"{100 * interval[k]:.1f}" for k in ("low", "high"))
    assert f"| fedbn | ce | 50.0 ± 14.1 | {low}-{high} | 90.0 |" in markdown
    # not uncertain, accuracy there, 95%-accurate share, ID test macro-F1, gap, val, seeds
    assert "| 69.2 | 88.9 | 38.5 | 95.0 | 5.0 | 75.0 | 2 |" in markdown
    mean_table = markdown.split("## Mean over held-out centres")[1]
    assert "| local | ce |" in mean_table and "local:x" not in mean_table
    assert "| fedbn | ce | 50.0 | n/a | 50.0 | 90.0 | 95.0 | 5.0 | 38.5 | 75.0 |" in mean_table


def test_command_lines_read_as_typed():
    argv = ["cytofed", "loco", "--run-config", "pretrained='imagenet' seed=1", "--out", "a b"]
    assert shell_join(argv) == ("cytofed loco --run-config \"pretrained='imagenet' seed=1\" "
                                "--out 'a b'")
    assert shell_join(["x", "it's $HOME"]) == "x 'it'\"'\"'s $HOME'"


def test_variants_are_rows_of_the_recipe_each_lever_on_and_off(tmp_path):
    variants = parse_variants("recipe: ; no-swa: average-last-rounds=0 ;"
                              "fedbn: strategy='fedbn' stain-sharing=true")
    assert variants == {"recipe": {}, "no-swa": {"average-last-rounds": 0},
                        "fedbn": {"strategy": "fedbn", "stain-sharing": True}}
    runs = plan(["a"], ["fedavg"], ["ce", "focal"], seeds=1, variants=variants)
    assert [(r.variant, r.method, r.loss) for r in runs] == [
        ("", "pooled", "ce"), ("recipe", "fedavg", "ce"), ("recipe", "fedavg", "focal"),
        ("no-swa", "fedavg", "ce"), ("no-swa", "fedavg", "focal"),
        ("fedbn", "fedbn", "ce"), ("fedbn", "fedbn", "focal")]
    assert runs[3].name == "a-no-swa-fedavg-ce-s0"
    recipe = {"average-last-rounds": 3, "augment": "domain_strong"}
    keys = run_overrides(runs[3], recipe, {"augment": "basic"}, tmp_path, variants)
    assert keys["average-last-rounds"] == 0 and keys["augment"] == "domain_strong"
    reference = run_overrides(runs[0], recipe, {"augment": "basic"}, tmp_path, variants)
    assert reference["augment"] == "basic" and reference["average-last-rounds"] == 3
    results = [(run, {run.method: {"held_out": metrics(0.5), "held_out_bn_adapted": None,
                                   "in_distribution_test": None, "id_ood_gap": None}}, [])
               for run in runs[:4]]
    rows = summarise(results, variants)
    assert [r.get("label") for r in rows] == [
        None, "recipe: fedavg / ce", "recipe: fedavg / focal", "no-swa: fedavg / ce"]
    assert rows[3]["variant"] == "average-last-rounds=0"
    assert rows[1]["variant"] == "the recipe as it is"
    header = {"command": "c", "machine": "m", "date": "d", "selection": "s", "recipe": recipe,
              "reference": {}, "recipe_chosen_on": "the training centres' validation splits"}
    markdown = render_markdown(header, rows)
    assert "- recipe chosen on: the training centres' validation splits" in markdown
    assert "| variant | method | loss | macro-F1 |" in markdown
    assert "| no-swa | fedavg | ce | 50.0 ± 0.0 | n/a |" in markdown
    assert "| - | pooled | ce | 50.0 | +0.0 |" in markdown.split("## Mean")[1]


@pytest.mark.parametrize(("text", "message"), [
    ("no colon here", "name: key=value"),
    ("a b: seed=1", "name: key=value"),
    ("x: seed=1", "'seed' identifies a run"),
    ("x: image-size=32; x: image-size=64", "used twice"),
    ("x: image-size=", "cannot read"),
])
def test_bad_variants_are_refused_naming_them(text, message):
    with pytest.raises(ValueError, match=message):
        parse_variants(text)


def loco_args(**given) -> argparse.Namespace:
    defaults = {"recipe": "", "run_config": "", "centres": "centres.toml", "model": None,
                "image_size": None, "rounds": None, "local_epochs": None, "device": None}
    return argparse.Namespace(**{**defaults, **given})


def test_the_recipe_file_is_under_run_config_under_explicit_flags(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "tf_efficientnet_lite0"\nimage-size = 96\n'
                      'augment = "domain_strong"\npretrained = "imagenet"\n')
    keys = _recipe(loco_args(recipe=str(recipe), image_size=32,
                             run_config="augment='basic' pretrained=''"))
    assert keys["model"] == "tf_efficientnet_lite0"  # the recipe's
    assert keys["image-size"] == 32  # an explicit flag
    assert (keys["augment"], keys["pretrained"]) == ("basic", "")  # --run-config, a default too
    assert keys["num-server-rounds"] == RunConfig().num_server_rounds  # neither sets it
    assert _recipe(loco_args())["model"] == RunConfig().model
    with pytest.raises(ValueError, match="--recipe"):
        _recipe(loco_args(run_config=f"recipe='{recipe}'"))


def test_jobs_share_the_cores_instead_of_each_taking_all_of_them(monkeypatch):
    """Two jobs on 2 cores run one torch thread each, and pass it on to the Ray workers they
    start (the environment); an explicit OMP_NUM_THREADS wins."""
    threads: list[int] = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    share_cores(2)
    assert os.environ["OMP_NUM_THREADS"] == "1" and threads == [1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    share_cores(2)
    assert threads == [1, 3]
