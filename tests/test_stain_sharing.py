"""Federated stain-style sharing: the pool's wire format, re-staining only with a pool, and on
the wire (the real ServerApp and ClientApp through ``tests.loopback``): a site whose centre
does not allow it sends no statistics; the run report lists what each site shared."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

import client.app
from client.app import app as client_app
from client.site import open_site
from common.config import RunConfig
from common.stain import REFERENCE_STYLE, Restainer, StainStats
from common.stain_sharing import pack_pool, site_restainer, unpack_pool
from server.app import main as server_main
from tests.loopback import LoopbackGrid, server_task
from tests.test_site_privacy import values_sent

OTHER = dataclasses.replace(REFERENCE_STYLE, lab_mean=(60.0, 20.0, -10.0),
                            lab_std=(15.0, 9.0, 12.0))


def test_the_pool_travels_as_flat_numbers_and_back():
    record = pack_pool({"b": OTHER, "a": REFERENCE_STYLE})
    assert record["stain-pool-centres"] == ["a", "b"]
    assert all(isinstance(v, float) for k, v in record.items() if k.startswith("stain-pool.")
               for v in v)
    assert unpack_pool(record) == {"a": REFERENCE_STYLE, "b": OTHER}
    assert unpack_pool({}) is None
    broken = {**record, "stain-pool.lab_std": [500.0, 1.0, 1.0, 1.0, 1.0, 1.0]}
    with pytest.raises(ValueError, match="lab_std"):
        unpack_pool(broken)


def test_a_site_restains_only_towards_other_sites_styles_of_a_pool():
    asked = []

    def own() -> StainStats:
        asked.append(True)
        return REFERENCE_STYLE

    assert site_restainer({}, "a", own, 0.5) is None
    assert not asked  # no pool: the site's own statistics are not even computed
    assert site_restainer(pack_pool({"a": REFERENCE_STYLE}), "a", own, 0.5) is None
    restainer = site_restainer(pack_pool({"a": REFERENCE_STYLE, "b": OTHER}), "a", own, 0.7)
    assert isinstance(restainer, Restainer) and restainer.probability == 0.7
    assert len(restainer.maps) == 1  # b's style only
    assert site_restainer(pack_pool({"b": OTHER}), "a", lambda: None, 0.5) is None


CENTRES = ('[[centre]]\nname = "clinic-a"\nformat = "synthetic"\n\n'
           '[[centre]]\nname = "clinic-b"\nformat = "synthetic"\nshare_stain = true\n\n'
           '[[centre]]\nname = "clinic-c"\nformat = "synthetic"\nshare_stain = true\n\n'
           '[[centre]]\nname = "clinic-d"\nformat = "synthetic"\n')


@pytest.fixture
def federation(tmp_path, monkeypatch):
    """One round of the real apps with stain sharing on; clinic-a does not allow it."""
    restainers: dict[str, Restainer | None] = {}
    real_fit = client.app.fit

    def spying_fit(model, data, *args, restainer=None, **kwargs):
        restainers[data.name] = restainer
        return real_fit(model, data, *args, restainer=restainer, **kwargs)

    monkeypatch.setattr(client.app, "fit", spying_fit)
    (tmp_path / "centres.toml").write_text(CENTRES)
    run_config = RunConfig(
        model="test_resnet", image_size=16, synthetic_images=40, num_server_rounds=1,
        augment="none", device="cpu", held_out="clinic-d", stain_sharing=True,
        data_source=str(tmp_path / "centres.toml"), output_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache")).to_dict()
    grid = LoopbackGrid(client_app, run_config, num_nodes=3)
    with server_task():
        server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=run_config))
    run_dir = next((tmp_path / "runs").glob("*"))
    return grid, json.loads((run_dir / "report.json").read_text()), run_dir, restainers


def test_a_site_that_does_not_share_its_stain_sends_no_statistics(federation):
    grid, report, run_dir, restainers = federation
    styles = {node: open_site(grid.context(node)).stain_style for node in (1, 2, 3)}
    assert all(styles.values())  # every site has a style; only two may share it
    sent = {node: [(kind, data) for n, kind, data in grid.wire if n == node]
            for node in (1, 2, 3)}
    assert "query.stain_stats" in {kind for kind, _ in sent[1]}  # asked, and declined
    for _, data in sent[1]:
        values = values_sent(data)
        assert b"stain_matrix" not in data and b"lab_mean" not in data
        assert list(styles[1].lab_mean) not in values
    for node in (2, 3):  # the check above can see the numbers when they are there
        [query] = [data for kind, data in sent[node] if kind == "query.stain_stats"]
        assert list(styles[node].lab_mean) in values_sent(query)
    sharing = report["stain_sharing"]
    assert sharing["shared"] == {"clinic-b": styles[2].to_dict(),
                                 "clinic-c": styles[3].to_dict()}
    assert [(d["centre"], d["reason"]) for d in sharing["declined"]] == [
        ("clinic-a", "its centre file does not allow sharing")]
    assert sharing["rejected"] == []
    # Every site re-stains towards the styles of the others in the pool, clinic-a too.
    assert {centre: len(r.maps) for centre, r in restainers.items()} == {
        "clinic-a": 2, "clinic-b": 1, "clinic-c": 1}
    markdown = (run_dir / "report.md").read_text()
    assert "Stain-style sharing" in markdown and "does not allow sharing" in markdown


def test_without_stain_sharing_no_site_is_asked_and_none_restains(tmp_path, monkeypatch):
    calls = []
    real_fit = client.app.fit
    monkeypatch.setattr(client.app, "fit", lambda *a, restainer=None, **k: (
        calls.append(restainer), real_fit(*a, restainer=restainer, **k))[1])
    (tmp_path / "centres.toml").write_text(CENTRES)
    run_config = RunConfig(
        model="test_resnet", image_size=16, synthetic_images=40, num_server_rounds=1,
        augment="none", device="cpu", held_out="clinic-d",
        data_source=str(tmp_path / "centres.toml"), output_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache")).to_dict()
    grid = LoopbackGrid(client_app, run_config, num_nodes=3)
    with server_task():
        server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=run_config))
    assert "query.stain_stats" not in {kind for _, kind, _ in grid.wire}
    assert calls == [None, None, None]
    report = json.loads(next(Path(tmp_path / "runs").glob("*/report.json")).read_text())
    assert "stain_sharing" not in report
