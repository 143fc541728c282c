"""The held-out evaluator site: the server's metrics, computed at the site, checked on arrival.

The ClientApp here is the real one (mods included), called in-process; the grid that carries
its messages is a stand-in for the SuperLink.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app
from common.config import ConfigError, parse_run_config
from common.data import CentreSpec
from common.evaluator_protocol import HELD_OUT_MESSAGE, decode_held_out, encode_held_out
from common.pipeline import new_model
from common.weights import model_state
from server import held_out as held_out_module
from server.held_out import ServerHeldOut, SiteHeldOut, held_out_metrics
from server.production import refuse_synthetic_in_production
from server.strategies import state_to_record
from tests.replies import EXPECTED

RUN_CONFIG = {"model": "test_resnet", "image-size": 32, "synthetic-images": 40,
              "test-time-bn": True, "held-out": "clinic-d", "round-timeout": 30.0,
              "held-out-evaluation": "site", "allow-synthetic": True}
CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")


@pytest.fixture(autouse=True)
def server_task(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    """Messages are created as by a ServerApp task of run 1; images decode into a temporary
    cache."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.setenv("CYTOFED_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setattr(held_out_module, "RETRY_SECONDS", 0.05)


def centre_file(folder: Path, name: str) -> str:
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\nformat = "synthetic"\n')
    return str(path)


class SitesGrid:
    """Delivers each message to the real ClientApp of its node, at once; ``fail`` counts how
    many held-out messages get an error instead of an answer. Each node is registered under
    its centre's name unless ``names`` says otherwise."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict, fail: int = 0) -> None:
        self.node_configs, self.run_config, self.fail = node_configs, run_config, fail
        self.names: dict[int, str] = {}
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def get_nodes(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(node_id=node, name=self.names.get(
                    node, Path(config.get("centre-config", "?")).stem))
                for node, config in self.node_configs.items()]

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            node = message.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config=self.node_configs[node],
                              state=RecordDict(), run_config=self.run_config)
            if self.fail and message.metadata.message_type == HELD_OUT_MESSAGE:
                self.fail -= 1
                context = Context(run_id=1, node_id=node, node_config={"role": "evaluator"},
                                  state=RecordDict(), run_config=self.run_config)
            self.replies[message.metadata.message_id] = app(message, context)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def deployment(tmp_path: Path, fail: int = 0) -> SitesGrid:
    """Three training sites (nodes 1-3) and the evaluator of clinic-d (node 9)."""
    nodes = {i: {"centre-config": centre_file(tmp_path, f"clinic-{c}")}
             for i, c in zip((1, 2, 3), "abc", strict=True)}
    nodes[9] = {"centre-config": centre_file(tmp_path, "clinic-d"), "role": "evaluator"}
    return SitesGrid(nodes, RUN_CONFIG, fail)


def global_arrays(seed: int = 3):
    config = parse_run_config({**RUN_CONFIG, "seed": seed})
    return state_to_record(model_state(new_model(config, len(CLASSES))))


def message(node: int, kind: str, content: RecordDict) -> Message:
    msg = Message(content, dst_node_id=node, message_type=kind)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def test_the_evaluator_site_sends_exactly_the_metrics_the_server_computes(tmp_path):
    config = parse_run_config(RUN_CONFIG)
    grid = deployment(tmp_path)
    site = SiteHeldOut(config, CentreSpec("clinic-d", format="synthetic"), grid)
    assert (site.node_id, sorted(site.training_grid.get_node_ids())) == (9, [1, 2, 3])
    model = new_model(config, len(CLASSES))
    arrays = global_arrays()
    at_site = site.evaluate(1, model, arrays)
    on_server = ServerHeldOut(config, CentreSpec("clinic-d", format="synthetic"),
                              grid).evaluate(1, model, arrays)
    assert at_site == on_server
    assert at_site["held_out_bn_adapted"] is not None  # test-time-bn: both fields travel
    assert np.sum(at_site["held_out"]["confusion_matrix"]) == 40


def test_the_evaluator_scores_at_the_temperature_the_server_sends(tmp_path):
    config = parse_run_config(RUN_CONFIG)
    grid = deployment(tmp_path)
    site = SiteHeldOut(config, CentreSpec("clinic-d", format="synthetic"), grid)
    model, arrays = new_model(config, len(CLASSES)), global_arrays()
    at_site = site.evaluate(1, model, arrays, temperature=3.0)
    sent = [m for m in grid.sent if m.metadata.message_type == HELD_OUT_MESSAGE][-1]
    assert sent.content["config"]["temperature"] == 3.0
    on_server = ServerHeldOut(config, CentreSpec("clinic-d", format="synthetic"),
                              grid).evaluate(1, model, arrays, 3.0)
    assert at_site == on_server
    plain = site.evaluate(1, model, arrays)
    for key in ("held_out", "held_out_bn_adapted"):
        assert at_site[key]["macro_f1"] == plain[key]["macro_f1"]
        assert at_site[key]["ece"] != pytest.approx(plain[key]["ece"], abs=1e-4)


def test_the_evaluator_never_trains_and_never_sends_weights(tmp_path):
    grid = deployment(tmp_path)
    context = Context(run_id=1, node_id=9, node_config=grid.node_configs[9],
                      state=RecordDict(), run_config=RUN_CONFIG)
    arrays = global_arrays()
    for kind in ("train", "evaluate", "query.class_counts"):
        reply = app(message(9, kind, RecordDict({"arrays": arrays, "config": ConfigRecord(
            {"server-round": 1})})), context)
        assert reply.has_error(), kind
        assert "never trains and never sends weights" in reply.error.reason
    answer = app(message(9, HELD_OUT_MESSAGE, RecordDict({"arrays": arrays})), context)
    assert not answer.has_error()
    assert not answer.content.array_records and not answer.content.metric_records
    assert set(answer.content["held-out"]) == {"centre", "metrics", "seconds"}


def test_a_training_site_refuses_the_held_out_message(tmp_path):
    grid = deployment(tmp_path)
    context = Context(run_id=1, node_id=1, node_config=grid.node_configs[1],
                      state=RecordDict(), run_config=RUN_CONFIG)
    reply = app(message(1, HELD_OUT_MESSAGE, RecordDict({"arrays": global_arrays()})), context)
    assert reply.has_error()
    assert "does not evaluate the held-out centre" in reply.error.reason


def test_failures_at_the_site_are_answered_without_paths(tmp_path):
    arrays = RecordDict({"arrays": global_arrays()})
    wrong_centre = Context(run_id=1, node_id=9, state=RecordDict(), run_config=RUN_CONFIG,
                           node_config={"centre-config": centre_file(tmp_path, "clinic-a"),
                                        "role": "evaluator"})
    reply = app(message(9, HELD_OUT_MESSAGE, arrays), wrong_centre)
    assert reply.has_error() and "ValueError" in reply.error.reason
    missing = tmp_path / "secret-folder" / "site.toml"
    broken = Context(run_id=1, node_id=9, state=RecordDict(), run_config=RUN_CONFIG,
                     node_config={"centre-config": str(missing), "role": "evaluator"})
    for kind in (HELD_OUT_MESSAGE, "query.role"):
        reply = app(message(9, kind, arrays), broken)
        assert reply.has_error() and "FileNotFoundError" in reply.error.reason
        assert "secret-folder" not in reply.error.reason and str(tmp_path) not in \
            reply.error.reason


def test_the_server_asks_again_after_a_failed_answer_and_then_gives_up(tmp_path):
    config = parse_run_config(RUN_CONFIG)
    grid = deployment(tmp_path, fail=1)
    site = SiteHeldOut(config, CentreSpec("clinic-d", format="synthetic"), grid)
    model = new_model(config, len(CLASSES))
    assert site.evaluate(1, model, global_arrays())["held_out"]["num_examples"] == 40
    assert [m.metadata.message_type for m in grid.sent].count(HELD_OUT_MESSAGE) == 2
    grid.fail = 10**6
    short = SiteHeldOut(parse_run_config({**RUN_CONFIG, "round-timeout": 0.5}),
                        CentreSpec("clinic-d", format="synthetic"), grid)
    with pytest.raises(RuntimeError, match=r"node 9\), round 2: it answered with an error"):
        short.evaluate(2, model, global_arrays())


def test_a_training_site_cannot_make_itself_the_evaluator(tmp_path, capsys):
    grid = deployment(tmp_path)
    grid.node_configs[1], grid.names[1] = grid.node_configs[9], "clinic-a"
    site = SiteHeldOut(parse_run_config(RUN_CONFIG), CentreSpec("clinic-d"), grid)
    assert site.node_id == 9
    assert sorted(site.training_grid.get_node_ids()) == [2, 3]  # it refuses training anyway
    assert "node 1 says it is the evaluator of 'clinic-d' but was registered as 'clinic-a'" \
        in capsys.readouterr().out
    del grid.node_configs[9]
    with pytest.raises(RuntimeError, match="registered with --name clinic-d"):
        SiteHeldOut(parse_run_config({**RUN_CONFIG, "round-timeout": 0.2}),
                    CentreSpec("clinic-d"), grid)


def test_the_server_refuses_to_start_without_exactly_one_evaluator_of_the_held_out_centre(
        tmp_path):
    config = parse_run_config({**RUN_CONFIG, "round-timeout": 0.2})
    spec = CentreSpec("clinic-d", format="synthetic")
    grid = deployment(tmp_path)
    del grid.node_configs[9]
    with pytest.raises(RuntimeError, match="no evaluator site of the held-out centre 'clinic-d'"):
        SiteHeldOut(config, spec, grid)
    grid.node_configs[7] = grid.node_configs[8] = {
        "centre-config": centre_file(tmp_path, "clinic-d"), "role": "evaluator"}
    with pytest.raises(RuntimeError, match=r"2 evaluator sites hold centre 'clinic-d' "
                                           r"\(nodes \[7, 8\]\)"):
        SiteHeldOut(config, spec, grid)


def test_a_simulation_keeps_the_server_side_evaluator():
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    grid = InMemoryGrid.__new__(InMemoryGrid)
    with pytest.raises(ConfigError, match="'held-out-evaluation': expected 'server' in a "
                                          "simulation"):
        SiteHeldOut(parse_run_config(RUN_CONFIG), CentreSpec("clinic-d"), grid)
    production = {**RUN_CONFIG, "allow-synthetic": False}
    refuse_synthetic_in_production(parse_run_config(production), grid)  # simulation: fine
    with pytest.raises(ConfigError, match="'data-source': expected the consortium's centres "
                                          "TOML file in a production run"):
        refuse_synthetic_in_production(parse_run_config(production), SitesGrid({}, {}))
    refuse_synthetic_in_production(parse_run_config(RUN_CONFIG), SitesGrid({}, {}))


def valid_result() -> dict:
    matrix = [[3, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0],
              [0, 0, 0, 1, 0]]
    metrics = {"macro_f1": 0.6, "balanced_accuracy": 0.6, "accuracy": 0.75, "ece": 0.1,
               "loss": 0.9, "num_examples": 8,
               "per_class_f1": {"neutrophil": 0.86, "lymphocyte": 0.8, "monocyte": 1.0,
                                "eosinophil": None, "basophil": 0.0},
               "confusion_matrix": matrix,
               "reliability": [{"lower": 0.8, "upper": 0.9, "count": 8, "confidence": 0.85,
                                "accuracy": 0.75}],
               "confidence_histogram": {"correct": [0] * 17 + [6, 0, 0],
                                        "wrong": [0] * 17 + [2, 0, 0]}}
    return {"held_out": metrics, "held_out_bn_adapted": None}


def tampered(change) -> str:
    result = valid_result()
    change(result["held_out"])
    return json.dumps(result)


@pytest.mark.parametrize(("change", "field"), [
    (lambda m: m["per_class_f1"].update({"<script>alert(1)</script>": 1.0}), "per_class_f1"),
    (lambda m: m.update(macro_f1=float("nan")), "not valid JSON"),
    (lambda m: m.update(macro_f1=1.5), "macro_f1"),
    (lambda m: m.update(macro_f1="0.9"), "macro_f1"),
    (lambda m: m["confusion_matrix"].pop(), "confusion_matrix"),
    (lambda m: m["confusion_matrix"][0].__setitem__(0, -3), "confusion_matrix"),
    (lambda m: m["confusion_matrix"][0].__setitem__(0, 30), "confusion_matrix"),
    (lambda m: m["confidence_histogram"]["wrong"].append(0), "confidence_histogram"),
    (lambda m: m.update(extra="x"), "held_out"),
    (lambda m: m["reliability"].extend([m["reliability"][0]] * 200), "reliability"),
    (lambda m: m.update(num_examples=True), "num_examples"),
])
def test_metrics_that_are_not_what_the_server_computes_are_refused(change, field):
    assert decode_held_out(encode_held_out(valid_result()), CLASSES) == valid_result()
    with pytest.raises(ValueError, match=field):
        decode_held_out(tampered(change), CLASSES)


def test_a_reply_without_metrics_is_refused():
    with pytest.raises(ValueError, match="no reply"):
        held_out_metrics([], CLASSES, EXPECTED)
    with pytest.raises(ValueError, match="at most"):
        decode_held_out(" " * 2_000_000, CLASSES)
