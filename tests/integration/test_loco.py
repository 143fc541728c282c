"""`cytofed loco` end to end on Flower's simulation engine (tiny synthetic centres)."""

import json
import subprocess
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, ROOT

pytestmark = pytest.mark.integration

CENTRES = "".join(f'[[centre]]\nname = "clinic-{c}"\nformat = "synthetic"\n\n' for c in "abc")


def test_loco_smoke_writes_pooled_and_federated_rows(flower_env, tmp_path):
    """Two runs at a time (--jobs 2): two federated runs with their own Ray instances at once."""
    (tmp_path / "centres.toml").write_text(CENTRES)
    out = tmp_path / "loco"
    command = [str(BIN / "cytofed"), "loco", "--centres", str(tmp_path / "centres.toml"),
               "--held-out", "clinic-a,clinic-b", "--strategies", "fedbn", "--losses", "ce",
               "--model", "test_resnet", "--image-size", "32", "--rounds", "2",
               "--seeds", "1", "--device", "cpu", "--jobs", "2", "--out", str(out),
               "--run-config",
               f"synthetic-images=40 cache-dir='{tmp_path / 'cache'}'"]
    result = subprocess.run(command, cwd=ROOT, env=flower_env, capture_output=True, text=True,
                            timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("[loco] ") == 5, output[-4000:]  # 4 runs and the closing line

    sweep = json.loads((out / "loco.json").read_text())
    assert sweep["header"]["command"].startswith("cytofed loco --centres")
    assert {"machine", "date", "selection", "recipe"} <= set(sweep["header"])
    rows = sweep["rows"]
    assert {(r["held_out"], r["method"], r["loss"]) for r in rows} == {
        (c, m, "ce") for c in ("clinic-a", "clinic-b") for m in ("pooled", "fedbn")}
    for row in rows:
        assert set(row["per_class_f1"]) == {"neutrophil", "lymphocyte", "monocyte",
                                            "eosinophil", "basophil"}
        assert 0.0 <= row["macro_f1_mean"] <= 1.0 and row["seeds"] == 1
        assert (row["bn_adapted_macro_f1_mean"] is None) == (row["method"] == "pooled")
        for run_dir in row["run_dirs"]:
            report = json.loads((Path(run_dir) / "report.json").read_text())
            assert report["held_out_centre"] == row["held_out"]
            assert row["held_out"] not in report["training_centres"]
    # --jobs 2: the second federated run started before the first had finished.
    federated = sorted(out.glob("runs/*-fedbn-ce-s0/report.json"))
    assert len(federated) == 2
    started = [datetime.strptime(p.parent.name[:15], "%Y%m%d-%H%M%S").timestamp()
               for p in federated]
    ended = [p.stat().st_mtime for p in federated]
    assert max(started) < min(ended), (started, ended)
    markdown = (out / "loco.md").read_text()
    assert markdown.count("## Held-out centre:") == 2
    assert "## Mean over held-out centres" in markdown
    assert (out / "comparison.html").is_file()


def test_loco_with_the_shipped_recipe_and_two_variants(flower_env, tmp_path):
    """`cytofed loco --recipe simulations/recipes/robust.toml --variants ...` on tiny synthetic
    clinics: explicit flags and --run-config shrink the recipe to a CPU smoke; each variant is
    a row with its interval; stain sharing shares the styles the centre files allow."""
    (tmp_path / "centres.toml").write_text(
        CENTRES.replace('format = "synthetic"\n', 'format = "synthetic"\nshare_stain = true\n'))
    out = tmp_path / "loco"
    command = [str(BIN / "cytofed"), "loco", "--centres", str(tmp_path / "centres.toml"),
               "--held-out", "clinic-a", "--recipe", "simulations/recipes/robust.toml",
               "--variants", "recipe:; restain: stain-sharing=true average-last-rounds=0",
               "--model", "test_resnet", "--image-size", "32", "--rounds", "1",
               "--device", "cpu", "--jobs", "2", "--out", str(out), "--run-config",
               f"pretrained='' synthetic-images=40 local-steps=2 batch-size=8 "
               f"cache-dir='{tmp_path / 'cache'}'"]
    result = subprocess.run(command, cwd=ROOT, env=flower_env, capture_output=True, text=True,
                            timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    sweep = json.loads((out / "loco.json").read_text())
    header = sweep["header"]
    assert header["recipe_file"].endswith("simulations/recipes/robust.toml")
    assert "validation splits only" in header["recipe_chosen_on"]
    assert header["recipe"]["augment"] == "domain_strong"  # from the recipe
    assert header["recipe"]["image-size"] == 32 and header["recipe"]["pretrained"] == ""
    rows = {r.get("variant_name", r["method"]): r for r in sweep["rows"]}
    assert set(rows) == {"pooled", "recipe", "restain"}
    for row in rows.values():
        interval = row["macro_f1_interval"]
        assert 0.0 <= interval["low"] <= interval["macro_f1"] <= interval["high"] <= 1.0
        assert 0.0 <= row["not_uncertain_share"] <= 1.0
    reports = {name: json.loads((Path(row["run_dirs"][0]) / "report.json").read_text())
               for name, row in rows.items()}
    recipe = tomllib.loads((ROOT / "simulations/recipes/robust.toml").read_text())
    assert reports["recipe"]["config"]["average-last-rounds"] == recipe["average-last-rounds"]
    assert reports["restain"]["config"]["average-last-rounds"] == 0  # the variant's
    assert reports["recipe"]["config"]["field-of-view"] == "cell"
    assert set(reports["restain"]["stain_sharing"]["shared"]) == {"clinic-b", "clinic-c"}
    assert "stain_sharing" not in reports["recipe"]
    assert all(c["local_steps"] == 2 for c in reports["recipe"]["rounds"][0]["clients"])
    assert reports["pooled"]["rounds"][0]["train"]["local_steps"] == 4  # two centres pooled
    markdown = (out / "loco.md").read_text()
    assert "| restain | fedavg | ce |" in markdown
    assert (out / "ablation.png").is_file()
