"""What leaves a site, read on the wire: class counts only where the centre shares them, and a
failure as a fixed code whose details stay in the site's log. The real ServerApp and ClientApp
exchange Flower's protobuf through ``tests.loopback``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from client.app import app as client_app
from client.errors import CONFIG, DATA, INTERNAL, error_code, site_errors_mod
from client.site import open_site
from common.centres import read_centre
from common.config import ConfigError, RunConfig
from server.app import main as server_main
from tests.loopback import LoopbackGrid, server_task

SECRET = "/nonexistent/secret-lab/patient-42"


@pytest.fixture(autouse=True)
def _server_task():
    with server_task():
        yield


def federate(tmp_path: Path, centres: str, **settings) -> tuple[LoopbackGrid, dict]:
    """One round of the real apps on the centres of ``centres`` (clinic-d held out)."""
    (tmp_path / "centres.toml").write_text(centres + '[[centre]]\nname = "clinic-d"\n'
                                                     'format = "synthetic"\n')
    run_config = RunConfig(**{
        "model": "test_resnet", "image_size": 16, "synthetic_images": 40,
        "num_server_rounds": 1, "augment": "none", "device": "cpu", "held_out": "clinic-d",
        "data_source": str(tmp_path / "centres.toml"), "output_dir": str(tmp_path / "runs"),
        "cache_dir": str(tmp_path / "cache"), **settings}).to_dict()
    grid = LoopbackGrid(client_app, run_config, num_nodes=2)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                              run_config=run_config))
    report = json.loads(next((tmp_path / "runs").glob("*/report.json")).read_text())
    return grid, report


def values_sent(data: bytes) -> list:
    """Every value of every config and metric record of an encoded reply."""
    proto = ProtoMessage()
    proto.ParseFromString(data)
    message = message_from_proto(proto)
    if message.has_error():
        return [message.error.reason]
    records = [*message.content.config_records.values(), *message.content.metric_records.values()]
    return [value for record in records for value in record.values()]


def test_a_centre_that_does_not_share_counts_sends_them_in_no_message(tmp_path):
    grid, report = federate(tmp_path, '[[centre]]\nname = "clinic-a"\nformat = "synthetic"\n'
                                      'share_counts = false\n\n'
                                      '[[centre]]\nname = "clinic-b"\nformat = "synthetic"\n\n',
                            class_prior="federated")
    counts = {node: open_site(grid.context(node)).train.class_counts().tolist()
              for node in (1, 2)}
    sent = {node: [(kind, data) for n, kind, data in grid.wire if n == node] for node in (1, 2)}
    assert {kind for kind, _ in sent[1]} == {"query.class_counts", "train", "evaluate",
                                             "evaluate.temperature_curve"}
    for _, data in sent[1]:
        assert b"class-counts" not in data and counts[1] not in values_sent(data)
    # The sharing site does send them: the check above can see counts when they are there.
    assert sum(counts[2] in values_sent(data) for _, data in sent[2]) == 2  # query, train
    clients = {c["centre"]: c for r in report["rounds"] for c in r["clients"]}
    assert "class-counts" not in clients["clinic-a"]
    assert clients["clinic-b"]["class-counts"] == counts[2]
    assert "No class counts reported by: clinic-a." in (
        next((tmp_path / "runs").glob("*/report.md")).read_text())


def test_a_site_error_reaches_the_server_as_a_code_and_its_path_stays_in_the_site_log(
        tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="cytofed.site"):
        grid, report = federate(
            tmp_path, '[[centre]]\nname = "clinic-a"\nformat = "synthetic"\n\n'
                      f'[[centre]]\nname = "clinic-b"\npath = "{SECRET}"\n\n')
    failed = [(kind, data) for node, kind, data in grid.wire if node == 2]
    # train, validation, and at the end the selected model's temperature curve, then the
    # model at that temperature on its validation and test splits
    assert [kind for kind, _ in failed] == ["train", "evaluate", "evaluate.temperature_curve",
                                            "evaluate", "evaluate"]
    for _, data in failed:
        assert values_sent(data) == [DATA] and b"secret-lab" not in data
    assert report["rounds"][0]["dropped"] == [{"node_id": 2, "reason": DATA}]
    assert report["calibration"]["left_out"] == [{"node_id": 2, "reason": DATA}]
    assert report["calibration"]["sites"] == ["clinic-a"]
    assert "secret-lab" not in next((tmp_path / "runs").glob("*/report.json")).read_text()
    logged = [r for r in caplog.records if r.name == "cytofed.site"]
    assert len(logged) == 5 and SECRET in logged[0].exc_text
    assert logged[0].getMessage() == f"train failed ({DATA} sent to the server)"


def raising(error: Exception):
    def handler(message: Message, context: Context) -> Message:
        raise error
    return handler


def bad_centre_file(tmp_path: Path) -> Exception:
    (tmp_path / "site.toml").write_text('name = "lab"\npath = "x"\ncolour = "blue"\n')
    with pytest.raises(ValueError) as raised:
        read_centre(tmp_path / "site.toml")
    return raised.value


@pytest.mark.parametrize(("make_error", "code"), [
    (lambda _: ConfigError("learning-rate", "a positive number", -1), CONFIG),
    (lambda _: FileNotFoundError(f"{SECRET}/labels.csv"), DATA),
    (bad_centre_file, DATA),
    (lambda _: ZeroDivisionError(f"row 7 of {SECRET}/labels.csv"), INTERNAL),
])
def test_every_failure_becomes_one_fixed_code(tmp_path, make_error, code):
    error = make_error(tmp_path)
    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = site_errors_mod(message, context, raising(error))
    assert error_code(error) == code
    assert (reply.error.code, reply.error.reason) == (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, code)
