"""The LOCO sweep's plan, aggregation over seeds and tables (no training)."""

import json

import pytest

from simulations.loco import (
    REFERENCE,
    Run,
    plan,
    render_markdown,
    run_overrides,
    selected_results,
    shell_join,
    summarise,
)

CLASSES = ("neutrophil", "basophil")


def metrics(f1: float, basophil: float | None = 0.5) -> dict:
    return {"macro_f1": f1, "balanced_accuracy": f1 + 0.1,
            "per_class_f1": {"neutrophil": f1, "basophil": basophil}}


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
    def report(name: str, best: dict, centre: str = "x") -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"training_centres": [centre], "best": best}))
        return path

    results = []
    for seed, f1 in enumerate((0.4, 0.6)):
        run = Run("a", "fedbn", "ce", seed)
        reports = [report(run.name, {"held_out": metrics(f1), "held_out_bn_adapted": metrics(0.9),
                                     "in_distribution_test": metrics(0.95),
                                     "id_ood_gap": 0.05})]
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

    header = {"command": "cytofed loco ...", "machine": "CPU", "date": "today",
              "selection": "validation", "recipe": {}, "reference": {}}
    other_centre = [{**r, "held_out": "b"} for r in rows.values() if ":" not in r["method"]]
    markdown = render_markdown(header, [*rows.values(), *other_centre])
    assert "## Held-out centre: a" in markdown and "F1 basophil" in markdown
    assert "| fedbn | ce | 50.0 ± 14.1 | 90.0 |" in markdown
    assert "| 95.0 | 5.0 | 2 |" in markdown  # ID test macro-F1, gap, seeds
    mean_table = markdown.split("## Mean over held-out centres")[1]
    assert "| local | ce |" in mean_table and "local:x" not in mean_table
    assert "| fedbn | ce | 50.0 | n/a | 50.0 | 90.0 | 95.0 | 5.0 |" in mean_table


def test_command_lines_read_as_typed():
    argv = ["cytofed", "loco", "--run-config", "pretrained='imagenet' seed=1", "--out", "a b"]
    assert shell_join(argv) == ("cytofed loco --run-config \"pretrained='imagenet' seed=1\" "
                                "--out 'a b'")
    assert shell_join(["x", "it's $HOME"]) == "x 'it'\"'\"'s $HOME'"
