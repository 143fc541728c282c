"""Fuzz: over a thousand malformed site replies through the server's whole reply path.

Each round, two honest sites answer well, one fails with an error whose text names its files,
and the other nodes answer with malformed replies: every named mutation of
``client.faults.MUTATIONS`` in turn, and random ones (wrong records, keys, types, values,
dtypes, shapes, bytes). The replies are real Flower ``Message`` objects, encoded and decoded
as Flower's protobuf (``tests.loopback.over_the_wire``), driven by the real round loop
(``server.federation.run_rounds``) into ``MethodStrategy`` (every method) and the
differential-privacy wrapper, recorded by the real ``RunRecorder`` (checkpoints, progress
file, report), stopped halfway and resumed. The same rounds with only the honest sites are run
beside: the global model and the pooled validation must be exactly theirs, every malformed
reply listed with its reason, nothing non-finite, nothing crashed.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from client.faults import MUTATIONS
from common.config import RunConfig
from common.methods import create_method
from common.metrics import classification_metrics
from server.app import federated_class_counts
from server.calibration import score_at_temperature
from server.federation import run_rounds
from server.privacy import LEDGER_FILE, PrivacyLedger, private_updates
from server.recorder import EndOfRun, RunRecorder
from server.replies import UNRECOGNISED_ERROR
from server.strategies import create_strategy, record_to_state, state_to_record
from tests.loopback import over_the_wire
from tests.replies import CENTRES, EXPECTED, report_content, train_content

pytestmark = pytest.mark.usefixtures("server_task")

GLOBAL = {"conv.weight": np.zeros((3, 4), np.float32),
          "bn.running_mean": np.zeros(3, np.float32), "bn.running_var": np.ones(3, np.float32),
          "fc.bias": np.zeros(2, np.float32)}
BUFFERS = {"bn.running_mean", "bn.running_var"}
HONEST = (1, 2)
FAILING = 3
MALFORMED = tuple(range(4, 28))  # 24 nodes with malformed replies every round
ROUNDS, STOP_AFTER = 4, 2
SECRET = "/hospital/secret-share/patients.csv row 17"
Reply = Callable[[Message, np.random.Generator], RecordDict]


# --- what honest sites send -------------------------------------------------------------


def honest_train(message: Message, node: int) -> RecordDict:
    server_round = int(message.content["config"]["server-round"])
    start = record_to_state(message.content["arrays"])
    step = 0.01 * node * server_round
    state = {key: value + np.float32(step) for key, value in start.items()}
    return train_content(state, examples=20 * node, centre=CENTRES[node - 1],
                         class_counts=[10 * node, 10 * node] if node == 1 else None)


def honest_report(message: Message, node: int) -> RecordDict:
    split = message.content["config"].get("split", "val")
    matrix = [8, 2, 1, 9] if node == 1 else [5, 0, 3, 2]
    return report_content(split, matrix, centre=CENTRES[node - 1], correct=0.8)


# --- what malformed sites send ------------------------------------------------------------


def _bad_values(key: str, value: object, rng: np.random.Generator) -> object:
    """A value no check accepts for ``key`` whose honest value is ``value``."""
    if key == "centre":
        return [b"lab-a", ["lab-a"], 5, True, "nowhere", "<script>x</script>"][rng.integers(6)]
    if isinstance(value, list):
        length = len(value)
        options = [value[:-1], [*value, value[-1]], "1,2", 3, [-1, *value[1:]],
                   [float("nan"), *map(float, value[1:])]]
        if key.endswith("_confusion_matrix") or key == "class-counts":
            options += [[value[0] + 1, *value[1:]], [float(v) + 0.5 for v in value]]
        else:
            options += [[1.5] * length, [value[0] + 0.3, *value[1:]]]
        return options[rng.integers(len(options))]
    options = [float("nan"), float("inf"), -float("inf"), -1, -0.5, 10**13, [value],
               b"bytes", "text"]
    if key == "num-examples":
        options += [0.5, value + 1 if isinstance(value, int) else 1.5]
    if key.endswith("_macro_f1"):
        options.append(1.5)
    return options[rng.integers(len(options))]


def _change_value(content: RecordDict, rng: np.random.Generator) -> None:
    name = ["metrics", "site"][rng.integers(2)] if "site" in content else "metrics"
    values = dict(content[name])
    key = sorted(values)[rng.integers(len(values))]
    values[key] = _bad_values(key, values[key], rng)
    # A record holds only what its Flower type allows: else the value travels as config.
    try:
        record = type(content[name])(values)
    except TypeError:
        record = ConfigRecord(values)
    _replace(content, name, record)


def _replace(content: RecordDict, name: str, record: MetricRecord | ConfigRecord) -> None:
    """A record replaced, of another type perhaps (without Flower's warning about it)."""
    del content[name]
    content[name] = record


def _delete_key(content: RecordDict, rng: np.random.Generator) -> None:
    name = ["metrics", "site"][rng.integers(2)]
    required = sorted(k for k in content[name] if k != "class-counts")
    del content[name][required[rng.integers(len(required))]]


def _add_key(content: RecordDict, rng: np.random.Generator) -> None:
    key = ["surprise", "<img src=x>", "num_examples", "centre2", "x" * 300][rng.integers(5)]
    content["metrics"][key] = float(rng.random())


def _records(content: RecordDict, rng: np.random.Generator) -> None:
    choice = rng.integers(4)
    if choice == 0:
        del content[sorted(content)[rng.integers(len(content))]]
    elif choice == 1:
        content[["extra", "arrays2", "<b>", "site "][rng.integers(4)]] = ConfigRecord({"x": 1})
    elif choice == 2:
        _replace(content, "metrics", ConfigRecord(dict(content["metrics"])))
    else:
        _replace(content, "site", MetricRecord({"centre": 1.0}))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _not_finite(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    changed = array.copy()
    changed.flat[rng.integers(array.size)] = [np.nan, np.inf, -np.inf][rng.integers(3)]
    return changed


def _change_tensor(content: RecordDict, rng: np.random.Generator) -> None:
    record = content["arrays"]
    key = sorted(record)[rng.integers(len(record))]
    array = record[key].numpy()
    dtypes = [np.int64, np.int32, np.float64, np.float16, np.complex64, np.bool_, np.uint16,
              "<U1", [("x", "<f4")], ">f4"]
    changes: list[Callable[[], Array | None]] = [
        lambda: Array(_not_finite(array, rng)),
        lambda: Array(array.astype(dtypes[rng.integers(len(dtypes))])),
        lambda: Array(array.reshape(-1, 1)),
        lambda: Array(np.append(array.ravel(), np.float32(0))),
        lambda: Array(array + np.float32(1e4)),
        lambda: Array(dtype="float32", shape=tuple(array.shape), stype="numpy.ndarray",
                      data=rng.bytes(int(rng.integers(0, 200)))),
        lambda: Array(dtype="float32", shape=tuple(array.shape), stype="numpy.ndarray",
                      data=_npy(np.zeros(array.size + 1, np.float32))),
        lambda: Array(dtype="float32", shape=tuple(array.shape), stype="torch.Tensor",
                      data=_npy(array)),
        lambda: None,
    ]
    changed = changes[rng.integers(len(changes))]()
    arrays = ArrayRecord({k: v for k, v in record.items() if k != key})
    if changed is not None:
        arrays[key] = changed
    if rng.random() < 0.2:
        arrays["extra.weight"] = Array(np.zeros(2, np.float32))
    content["arrays"] = arrays


RANDOM_TRAIN = (_change_value, _delete_key, _add_key, _records, _change_tensor)
RANDOM_REPORT = (_change_value, _delete_key, _add_key, _records)


def malformed(message: Message, node: int, server_round: int) -> RecordDict:
    """Node ``node``'s malformed reply: a named mutation (each in turn), or one to three
    random ones (a later one that no longer applies, its record gone, is skipped)."""
    kind = message.metadata.message_type
    honest = honest_train(message, 1) if kind == "train" else honest_report(message, 1)
    rng = np.random.default_rng([server_round, node, len(kind)])
    named = list(MUTATIONS[kind].values())
    turn = (server_round * len(MALFORMED) + node) // 2
    if node % 2 == 0:
        named[turn % len(named)](honest)
    else:
        families = RANDOM_TRAIN if kind == "train" else RANDOM_REPORT
        families[rng.integers(len(families))](honest, rng)
        for _ in range(int(rng.integers(0, 3))):
            try:
                families[rng.integers(len(families))](honest, rng)
            except (KeyError, ValueError, TypeError):
                continue
    return honest


class FuzzGrid:
    """Nodes 1..n answering at once: honest, failing or malformed; every reply encoded and
    decoded as Flower's protobuf. Counts the malformed replies it delivered."""

    def __init__(self, nodes: tuple[int, ...]) -> None:
        self.nodes = nodes
        self.replies: dict[str, Message] = {}
        self.malformed = 0
        self.server_round = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            received, _ = over_the_wire(message)
            reply = self.answer(received)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.replies[message.object_id], _ = over_the_wire(reply)
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def answer(self, message: Message) -> Message:
        node, kind = message.metadata.dst_node_id, message.metadata.message_type
        if kind == "train":
            self.server_round = int(message.content["config"]["server-round"])
        if node == FAILING:
            return Message(Error(code=1, reason=SECRET), reply_to=message)
        if node in HONEST:
            make = honest_train if kind == "train" else honest_report
            return Message(make(message, node), reply_to=message)
        self.malformed += 1
        return Message(malformed(message, node, self.server_round), reply_to=message)


# --- the server side ----------------------------------------------------------------------


def held_out(server_round: int, arrays: ArrayRecord) -> dict:
    """The server's own held-out metrics (no site sends them here)."""
    labels = np.arange(40) % 2
    probabilities = np.full((40, 2), 0.3)
    probabilities[np.arange(40), labels] = 0.7
    return {"held_out": {**classification_metrics(labels, probabilities, ("a", "b")),
                         "loss": 0.5}, "held_out_bn_adapted": None}


def federation(config: RunConfig, grid: FuzzGrid, name: str, first: int, last: int,
               private: bool) -> tuple[RunRecorder, object, ArrayRecord]:
    """Rounds ``first..last`` of the run ``name`` (resumed when it has completed some)."""
    strategy = create_strategy(config, create_method(config), GLOBAL, EXPECTED)
    dp = private_updates(strategy, config, len(HONEST), BUFFERS) if private else None
    recorder = RunRecorder(config, ("a", "b"), "wbc5", list(CENTRES[:2]), run_name=name)
    if dp:
        dp.rng = np.random.default_rng(recorder.completed)  # the same noise in both runs
        dp.use_ledger(PrivacyLedger(recorder.path / LEDGER_FILE), recorder.rounds)
    state = recorder.checkpoint if recorder.checkpoint is not None else GLOBAL

    def finish_round(result, arrays: ArrayRecord, exported: ArrayRecord) -> None:
        record = {**result.to_dict(), **({"privacy": dp.round_privacy()} if dp else {})}
        recorder.complete_round(record, record_to_state(arrays), record_to_state(exported))

    final = run_rounds(dp or strategy, grid, state_to_record(state), first, last,
                       ConfigRecord(), lambda a: a, held_out, finish_round, timeout=5)
    return recorder, dp or strategy, final


@pytest.mark.parametrize("method", ["fedavg", "fedmedian", "fedtrimmedavg", "fedadam",
                                    "fedbn", "fedavg+dp"])
def test_malformed_replies_never_crash_a_round_nor_reach_the_model(method, tmp_path, capsys):
    private = method.endswith("+dp")
    config = RunConfig(strategy=method.removesuffix("+dp"), num_server_rounds=ROUNDS,
                       min_train_nodes=2, output_dir=str(tmp_path / "runs"),
                       dp_noise_multiplier=1.0 if private else 0.0,
                       dp_clipping_norm=0.5, server_learning_rate=0.1)
    fuzzed, honest = FuzzGrid((*HONEST, FAILING, *MALFORMED)), FuzzGrid(HONEST)
    runs = {}
    for name, grid in (("fuzzed", fuzzed), ("honest", honest)):
        # Stopped after round STOP_AFTER, then resumed from its checkpoint and progress file.
        federation(config, grid, name, 1, STOP_AFTER, private)
        recorder, strategy, final = federation(config, grid, name, STOP_AFTER + 1, ROUNDS,
                                               private)
        assert recorder.completed == ROUNDS
        runs[name] = (recorder, strategy, record_to_state(final))
    (recorder, strategy, final), (_, _, expected) = runs["fuzzed"], runs["honest"]
    assert fuzzed.malformed == 2 * ROUNDS * len(MALFORMED)

    for key, value in final.items():  # exactly the honest sites' aggregate, and finite
        assert np.all(np.isfinite(value)), key
        np.testing.assert_array_equal(value, expected[key])
    rounds = json.loads((recorder.path / "progress.json").read_text())["rounds"]
    honest_rounds = runs["honest"][0].rounds
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for recorded, clean in zip(rounds, honest_rounds, strict=True):
        assert recorded["validation"] == clean["validation"]
        assert recorded["train"] == clean["train"]
        for reply in ("train", "val"):
            refused = {r["node_id"] for r in recorded["rejected"] if r["reply"] == reply}
            assert refused == set(MALFORMED), (reply, set(MALFORMED) - refused)
        for rejection in recorded["rejected"]:
            assert 0 < len(rejection["reason"]) < 300 and "<" not in rejection["reason"]
        assert recorded["dropped"] == [{"node_id": FAILING, "reason": UNRECOGNISED_ERROR}]
        assert {c["centre"] for c in recorded["clients"] if "centre" in c} <= set(CENTRES)
        assert (recorded["sampled"], recorded["replied"]) == (27, 26)
    assert SECRET not in (recorder.path / "progress.json").read_text()
    if method in ("fedavg", "fedavg+dp"):  # the test splits, the report and the model card
        refused_in_rounds = len(strategy.rejected)
        reports = score_at_temperature(strategy, fuzzed, state_to_record(recorder.best_state()),
                                       ROUNDS, timeout=5, temperature=1.0)
        assert fuzzed.malformed == (2 * ROUNDS + 2) * len(MALFORMED)
        for split in ("val", "test"):
            assert sorted(t["centre"] for t in reports[split]) == list(CENTRES[:2])
        refused = strategy.rejected[refused_in_rounds:]
        for split in ("val", "test"):
            assert {r["node_id"] for r in refused if r["reply"] == split} == set(MALFORMED)
        end = EndOfRun(1.0, {}, reports["val"], reports["test"], held_out(ROUNDS, None))
        recorder.finish(final, end, {"rejected_replies": refused, **(
            {"privacy": strategy.privacy_report()} if private else {})})
        report = json.loads((recorder.path / "report.json").read_text())
        assert report["best"]["in_distribution_test"]["num_examples"] == 30
        assert math.isfinite(report["model"]["uncertainty"]["threshold"])
        markdown = (recorder.path / "report.md").read_text()
        assert all(f"| {node} |" in markdown for node in MALFORMED)
        assert SECRET not in markdown and "<script>" not in markdown
    if private:
        ledger = [json.loads(line) for line in
                  (recorder.path / LEDGER_FILE).read_text().splitlines()]
        assert [line["contributions"] for line in ledger] == [2] * ROUNDS
    assert "Traceback" not in capsys.readouterr().out


def test_malformed_class_counts_are_refused_before_they_reach_the_loss():
    good = {1: [3, 4], 2: [5, 0]}
    bad = [{"share-counts": True, "centre": "lab-c", "counts": [1, 2, 3]},
           {"share-counts": True, "centre": "lab-c", "counts": [-5, 2]},
           {"share-counts": True, "centre": "lab-c", "counts": "1,2"},
           {"share-counts": True, "centre": "lab-c"},
           {"share-counts": "yes", "centre": "lab-c", "counts": [1, 2]},
           {"share-counts": True, "centre": b"lab-c", "counts": [1, 2]},
           {"share-counts": True, "centre": "lab-c", "counts": [10**6, 10**6]},
           {"share-counts": False, "centre": "lab-c", "counts": [1, 2]}]

    class CountsGrid(FuzzGrid):
        def answer(self, message: Message) -> Message:
            node = message.metadata.dst_node_id
            values = ({"share-counts": True, "centre": CENTRES[node - 1], "counts": good[node]}
                      if node in good else bad[node - 3])
            return Message(RecordDict({"config": ConfigRecord(values)}), reply_to=message)

    rejected: list[dict] = []
    assert federated_class_counts(CountsGrid((1, 2)), EXPECTED, 5, rejected).tolist() == [8, 4]
    assert rejected == []
    for node in range(3, 3 + len(bad)):
        assert federated_class_counts(CountsGrid((1, 2, node)), EXPECTED, 5, rejected) is None
        assert [r["node_id"] for r in rejected] == [node]
        rejected.clear()
