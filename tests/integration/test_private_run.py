"""A differentially private run of a BatchNorm model through `flwr run .` on Flower's real
simulation engine: one site does not share its class counts, one cannot read its data."""

import json
import math
import re
from pathlib import Path

import pytest

from tests.integration.conftest import flwr_run
from tests.test_privacy import gaussian_epsilon

pytestmark = pytest.mark.integration

SECRET = "/nonexistent/secret-lab/patient-42"
CENTRES = ('[[centre]]\nname = "clinic-a"\nformat = "synthetic"\nshare_counts = false\n\n'
           '[[centre]]\nname = "clinic-b"\nformat = "synthetic"\n\n'
           f'[[centre]]\nname = "clinic-c"\npath = "{SECRET}"\n\n'
           '[[centre]]\nname = "clinic-d"\nformat = "synthetic"\n')


def test_private_batchnorm_run_stays_finite_and_reports_an_honest_epsilon(flower_env, tmp_path):
    (tmp_path / "centres.toml").write_text(CENTRES)
    output = flwr_run(flower_env, {
        "num-server-rounds": 3, "model": "test_resnet", "norm": "batch", "image-size": 32,
        "synthetic-images": 80, "dp-noise-multiplier": 1.0,
        "data-source": str(tmp_path / "centres.toml"), "output-dir": str(tmp_path / "runs"),
        "cache-dir": str(tmp_path / "cache"),
    }, supernodes=3)
    assert len(re.findall(r"\[cytofed\] round \d/3", output)) == 3, output[-3000:]
    run_dir = Path(re.search(r"\[cytofed\] report: (\S+)", output).group(1)).parent
    report = json.loads((run_dir / "report.json").read_text())
    for result in report["rounds"]:
        assert all(math.isfinite(result["held_out"][k]) for k in ("macro_f1", "ece", "loss"))
        assert [d["reason"] for d in result["dropped"]] == ["site-error:data"]
        assert sorted(c["centre"] for c in result["clients"]) == ["clinic-a", "clinic-b"]
        assert all("class-counts" not in c for c in result["clients"]
                   if c["centre"] == "clinic-a")
    ledger = [json.loads(line) for line in (run_dir / "privacy-ledger.jsonl").open()]
    assert [(e["round"], e["contributions"], e["denominator"]) for e in ledger] == [
        (1, 2, 3), (2, 2, 3), (3, 2, 3)]
    privacy = report["privacy"]
    assert privacy["releases"] == 3
    assert privacy["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 3, 1e-5), rel=1e-3)
    assert "secret-lab" not in (run_dir / "report.json").read_text()
    assert SECRET in output  # the site's own log (the simulation prints it) has the details
