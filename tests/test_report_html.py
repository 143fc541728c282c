"""The self-contained HTML run report and the multi-run comparison."""

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.metrics import classification_metrics
from server.comparison import render_comparison, rows_from_reports
from server.report import write_report
from simulations.cli import main

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
RUN_SECTIONS = {"Held-out centre clinic-d", "In distribution vs held out", "F1 over rounds",
                "Calibration", "Centres", "Dropped or rejected clients", "Model", "Configuration"}


class Page(HTMLParser):
    """Section titles, image sources, table count and any reference to outside assets."""

    def __init__(self) -> None:
        super().__init__()
        self.titles: list[str] = []
        self.images: list[str] = []
        self.tables = 0
        self.external: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self._in_h2 = tag == "h2"
        self.tables += tag == "table"
        if tag == "img":
            self.images.append(attributes["src"])
        if tag in ("script", "link") or (tag != "img" and ("src" in attributes
                                                           or "href" in attributes)):
            self.external.append(tag)

    def handle_data(self, data):
        if self._in_h2:
            self.titles.append(data)
            self._in_h2 = False


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    page.close()
    return page


def assert_embedded_pngs(page: Page, count: int) -> None:
    assert len(page.images) == count
    for source in page.images:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        data = base64.b64decode(source[len(prefix):], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.size[0] > 100


def held_out_metrics(seed: int, accuracy: float) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), 200)
    probabilities = rng.dirichlet(np.ones(len(CLASSES)), 200)
    right = rng.random(200) < accuracy
    probabilities[right, labels[right]] += 2
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return {**classification_metrics(labels, probabilities, CLASSES), "loss": 1.0}


def make_report(run_dir: Path, strategy: str = "fedavg", seed: int = 0,
                held_out: str = "clinic-d") -> dict:
    """A finished run's report with two rounds, one dropped and one rejected client."""
    clients = [{"node_id": 10 + i, "centre": centre, "class-counts": [50, 30, 10, 8, 2 + i],
                "train_loss": 0.5, "num-examples": 100} for i, centre in enumerate("abc")]
    dropped = {"node_id": 12, "reason": "no reply before the round timeout"}
    rejected = {"node_id": 11, "reason": "basophil.weight contains NaN"}
    rounds = [{"round": 1, "train": {"train_loss": 1.0}, "validation": {"val_macro_f1": 0.3},
               "held_out": held_out_metrics(seed + 1, 0.4), "held_out_bn_adapted": None,
               "seconds": 2.0, "sampled": 3, "replied": 2, "clients": clients[:2],
               "dropped": [dropped], "rejected": []},
              {"round": 2, "train": {"train_loss": 0.5}, "validation": {"val_macro_f1": 0.6},
               "held_out": held_out_metrics(seed + 2, 0.8), "held_out_bn_adapted": None,
               "seconds": 2.0, "sampled": 3, "replied": 3, "clients": clients,
               "dropped": [], "rejected": [rejected]}]
    return {"run_name": "cytofed", "run_dir": str(run_dir),
            "config": {"strategy": strategy, "loss": "focal", "model": "test_resnet",
                       "image-size": 32, "held-out": held_out},
            "classes": CLASSES, "held_out_centre": held_out, "training_centres": list("abc"),
            "rounds": rounds, "final": {"round": 2, "held_out": rounds[1]["held_out"]},
            "best": {"round": 2, "selected_by": "sites' validation macro-F1",
                     "temperature": 0.8, "held_out": held_out_metrics(seed + 2, 0.8),
                     "in_distribution_test": {
                         **held_out_metrics(seed + 3, 0.95),
                         "sites": [{"centre": c, "macro_f1": 0.9, "num_examples": 30}
                                   for c in "abc"]},
                     "id_ood_gap": 0.25},
            "calibration": {"temperature": 0.8, "selected_by": "the sites' summed NLL",
                            "sites": list("abc"), "left_out": [{"node_id": 12, "reason": "x"}],
                            "validation_nll": 0.5, "validation_nll_at_1": 0.7,
                            "validation": {}},
            "held_out_macro_f1": rounds[1]["held_out"]["macro_f1"],
            "model": {"card": "model_card.json", "weights": "best.safetensors",
                      "uncertainty": {"threshold": 0.6, "target_error": 0.05, "coverage": 0.5,
                                      "error_rate": 0.04,
                                      "calibrated_on": "the sites' validation splits"},
                      "held_out_at_threshold": {"coverage": 0.4, "error_rate": 0.1}}}


def test_run_report_html_is_self_contained_with_every_section(tmp_path):
    report = make_report(tmp_path)
    assert write_report(tmp_path, report) == tmp_path / "report.json"
    assert json.loads((tmp_path / "report.json").read_text()) == report
    page = parse(tmp_path / "report.html")
    assert set(page.titles) >= RUN_SECTIONS
    # confusion matrix, per-class F1, in distribution vs held out, F1 over rounds, reliability
    assert_embedded_pngs(page, 5)
    assert not page.external and page.tables >= 8
    text = (tmp_path / "report.html").read_text()
    for expected in ("no reply before the round timeout", "basophil.weight contains NaN",
                     "uncertain when its confidence is below 0.60", "clinic-d (held out)",
                     "gap (in distribution - held out)", "a (test split)",
                     "Temperature T=0.8 divides every logit", "best round (2, at T=0.8)",
                     "pooled validation NLL 0.500 per image (at T=1: 0.700)",
                     "node 12 (x)"):
        assert expected in text
    markdown = (tmp_path / "report.md").read_text()
    assert "![reliability diagram, exported model, at T=0.8](reliability.png)" in markdown
    assert "| a | 50 | 30 | 10 | 8 | 2 | 100 |" in markdown


def test_report_without_optional_parts_still_renders(tmp_path):
    report = make_report(tmp_path)
    del report["model"]
    for r in report["rounds"]:
        del r["clients"]
        r["held_out"] = {k: v for k, v in r["held_out"].items() if k != "reliability"}
    report["final"]["held_out"] = report["best"]["held_out"] = report["rounds"][1]["held_out"]
    report["best"]["in_distribution_test"] = report["best"]["id_ood_gap"] = None
    del report["calibration"], report["best"]["temperature"]  # a report from before
    write_report(tmp_path, report)
    page = parse(tmp_path / "report.html")
    assert_embedded_pngs(page, 3)
    assert "No class counts reported by: a, b, c." in (tmp_path / "report.html").read_text()


def test_comparison_of_runs_has_a_bar_chart_per_held_out_centre(tmp_path):
    reports = [make_report(tmp_path / f"r{i}", strategy, seed=i, held_out=centre)
               for i, (strategy, centre) in enumerate([("fedavg", "clinic-d"),
                                                       ("fedavg", "clinic-d"),
                                                       ("fedprox", "clinic-d"),
                                                       ("fedavg", "clinic-a")])]
    other_model = make_report(tmp_path / "r4", "fedprox")
    other_model["config"]["model"] = "resnet18"
    rows = rows_from_reports([*reports, other_model])
    assert [(r["held_out"], r["method"], len(r["run_dirs"])) for r in rows] == [
        ("clinic-d", "fedavg", 2), ("clinic-d", "fedprox", 1), ("clinic-a", "fedavg", 1),
        ("clinic-d", "fedprox", 1)]
    assert [(r.get("label"), r.get("variant")) for r in rows] == [
        (None, None), ("fedprox / focal [1]", "model=test_resnet"), (None, None),
        ("fedprox / focal [2]", "model=resnet18")]
    f1 = [r["final"]["held_out"]["macro_f1"] for r in reports[:2]]
    assert rows[0]["macro_f1_mean"] == pytest.approx(np.mean(f1))
    assert rows[0]["macro_f1_std"] == pytest.approx(np.std(f1, ddof=1))
    assert rows[0]["bn_adapted_macro_f1_mean"] is None
    loco_row = {"held_out": "clinic-a", "method": "pooled", "loss": "ce", "macro_f1_mean": 0.9,
                "macro_f1_std": 0.01, "balanced_accuracy_mean": 0.88,
                "per_class_f1": dict.fromkeys(CLASSES, 0.9), "run_dirs": ["x", "y"]}
    path = render_comparison([*rows, loco_row], tmp_path / "cmp")
    page = parse(path)
    assert {"All results", "Held-out centre clinic-d", "Held-out centre clinic-a"} <= set(
        page.titles)
    assert_embedded_pngs(page, 2)
    assert "pooled / ce" in path.read_text() and "model=resnet18" in path.read_text()
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"][-1] == loco_row


def test_report_command_rewrites_runs_and_compares_them(tmp_path, capsys):
    runs = []
    for i in range(2):
        run_dir = tmp_path / "runs" / f"run{i}"
        run_dir.mkdir(parents=True)
        (run_dir / "report.json").write_text(json.dumps(make_report(run_dir, seed=i)))
        runs.append(str(run_dir))
    assert main(["report", *runs]) == 0
    assert all((Path(r) / "report.html").is_file() for r in runs)
    assert (tmp_path / "runs" / "comparison.html").is_file()
    assert str(tmp_path / "runs" / "comparison.html") in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2  # neither report.json nor loco.json


def test_a_sweep_with_intervals_gets_an_ablation_figure_and_its_notes(tmp_path, capsys):
    def row(centre: str, label: str, f1: float) -> dict:
        return {"held_out": centre, "method": "fedavg", "loss": "ce", "label": label,
                "variant": "average-last-rounds=0" if label == "no-swa" else "",
                "macro_f1_mean": f1, "macro_f1_std": 0.0, "balanced_accuracy_mean": f1,
                "per_class_f1": dict.fromkeys(CLASSES, f1), "run_dirs": ["r"],
                "macro_f1_interval": {"macro_f1": f1, "low": f1 - 0.1, "high": f1 + 0.05,
                                      "level": 0.95},
                "not_uncertain_share": 0.6, "not_uncertain_accuracy": 0.95,
                "accurate_share_oracle": 0.25, "selection_score_mean": f1 + 0.2}

    rows = [row(c, label, f1) for c in ("clinic-a", "clinic-b")
            for label, f1 in (("recipe", 0.7), ("no-swa", 0.6))]
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    header = {"command": "cytofed loco --recipe robust.toml", "machine": "CPU", "date": "today",
              "recipe_chosen_on": "the training centres' validation splits only"}
    (sweep / "loco.json").write_text(json.dumps({"header": header, "rows": rows}))
    assert main(["report", str(sweep), "--out", str(tmp_path / "cmp")]) == 0
    page = parse(tmp_path / "cmp" / "comparison.html")
    assert_embedded_pngs(page, 3)  # the ablation figure and one chart per centre
    assert (tmp_path / "cmp" / "ablation.png").is_file()
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "The recipe was chosen on the training centres' validation splits only." in markdown
    assert "0.600-0.750" in markdown and "| 0.600 | 0.950 | 0.250 | 0.900 | 1 |" in markdown
    assert "val (training centres: what a recipe is chosen on)" in markdown
