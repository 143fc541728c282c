"""Packing centres for another machine: same images, labels and splits, both fields of view."""

import numpy as np

from common.centres import load_centre, read_centres
from common.data import split_indices
from simulations.bundle import install, pack

SIZE = 32


def test_a_packed_centre_loads_like_the_original(tmp_path, wbc_class_folders):
    centres = tmp_path / "centres.toml"
    centres.write_text(f'[[centre]]\nname = "site"\npath = "{wbc_class_folders}"\n'
                       'format = "folder"\nsplit_seed = 3\n')
    bundle = tmp_path / "bundle"
    assert pack(centres, bundle, SIZE, tmp_path / "cache-here") > 0

    [original] = read_centres(centres)
    [packed] = read_centres(bundle / "centres.toml")
    assert packed.split_seed == 3 and packed.format == "manifest"
    # 21 readable wbc5 files, two of them byte-identical: one cache entry
    assert install(bundle, SIZE, tmp_path / "cache-there") == 20

    for mode in ("full", "cell"):
        before = load_centre(original, SIZE, tmp_path / "cache-here", mode=mode)
        after = load_centre(packed, SIZE, tmp_path / "cache-there", mode=mode)
        assert np.array_equal(before.labels, after.labels)
        difference = np.abs(before.images.astype(int) - after.images.astype(int)).mean()
        assert difference < 6, (mode, difference)  # lossy re-encoding only
        for split, index in split_indices(before.labels, before.groups, 3).items():
            assert np.array_equal(split_indices(after.labels, after.groups, 3)[split], index)
