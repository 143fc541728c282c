"""`cytofed bench --sites`: the synthetic federation it builds and how it measures memory."""

from __future__ import annotations

import numpy as np
import pytest

from common.centres import load_centre, read_centres
from simulations.bench_sites import (
    HELD_OUT,
    centres_file,
    parse_site_counts,
    peak_resident_bytes,
    write_federation,
)


def test_site_counts_are_parsed_and_checked():
    assert parse_site_counts("3,10,30") == [3, 10, 30]
    for bad in ("3,x", "1,3", ""):
        with pytest.raises(ValueError, match="--sites"):
            parse_site_counts(bad)


def test_the_federation_has_distinct_sites_and_a_held_out_centre(tmp_path):
    write_federation(tmp_path / "fed", sites=4, image_size=16, cache=tmp_path / "cache",
                     images_per_site=5)
    centres = read_centres(centres_file(tmp_path / "fed", 3))
    assert [c.name for c in centres] == ["site-00", "site-01", "site-02", HELD_OUT]
    loaded = {c.name: load_centre(c, 16, tmp_path / "cache") for c in centres}
    assert [len(d) for d in loaded.values()] == [5, 5, 5, 10]
    # sites 0 and 3 both come from clinic A, with different images
    fourth = next(c for c in read_centres(centres_file(tmp_path / "fed", 4))
                  if c.name == "site-03")
    assert not np.array_equal(load_centre(fourth, 16, tmp_path / "cache").images,
                              loaded["site-00"].images)


def test_peak_memory_sees_an_allocation_made_and_freed_inside_the_block():
    with peak_resident_bytes() as memory:
        block = np.ones(200 * 2**20, np.uint8)  # touched: resident
        del block
    assert memory["peak"] - memory["baseline"] >= 150 * 2**20
