"""`flwr run .` on Flower's simulation engine: the ServerApp leaves out of the held-out centre
the images a training centre also holds, and says how many."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import flwr_run
from tests.test_duplicates import write_centres_with_shared_images

pytestmark = pytest.mark.integration


def test_server_app_scores_the_held_out_centre_without_shared_images(flower_env, tmp_path):
    centres = write_centres_with_shared_images(tmp_path)
    output = flwr_run(flower_env, {
        "data-source": str(centres), "held-out": "held", "num-server-rounds": 1,
        "model": "test_resnet", "image-size": 16, "augment": "none", "device": "cpu",
        "output-dir": str(tmp_path / "runs"), "cache-dir": str(tmp_path / "cache"),
    }, supernodes=2, timeout=600)
    assert "held-out centre held: 2 images also in a training centre left out, 9 kept" in \
        output, output[-3000:]
    report_path = Path(re.search(r"\[cytofed\] report: (\S+)", output).group(1))
    report = json.loads(report_path.read_text())
    assert report["held_out_data"]["shared_with_training"] == 2
    assert np.asarray(report["final"]["held_out"]["confusion_matrix"]).sum() == 9
    assert "Left out: 2 images that a training centre also holds" in \
        (report_path.parent / "report.md").read_text()
