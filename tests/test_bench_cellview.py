"""The cell-view benchmark runs end to end on a few shared images (a smoke test, no timing)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from simulations.bench_cellview import BASELINE, main

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "wbc"


def baseline_available() -> bool:
    return subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{BASELINE}^{{commit}}"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared data at {SHARED}")
@pytest.mark.skipif(not baseline_available(), reason="baseline commit not in this clone")
def test_benchmark_prints_both_speeds_their_ratio_and_the_crop_agreement(capsys):
    assert main(["--limit", "6", "--sample", "2", "--size", "32"]) == 0
    out = capsys.readouterr().out
    for centre in ("barcelona", "jiangxi", "bccd"):
        assert re.search(rf"{centre}: 6 images; baseline \d+ images/s .* this tree \d+ images/s"
                         r" .*: [\d.]+x faster", out)
    assert "where the baseline was right: windows within 1 px" in out
    assert re.search(r"all centres: 18 images; .*: [\d.]+x faster", out)
