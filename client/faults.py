"""Test-only fault injection: a SuperNode told to misbehave, so tests can watch the server cope.

A ClientApp honours a fault only when its SuperNode was started with it in ``node_config``,
for example ``flower-supernode --node-config "centre-config='...' fault='nan-weights'"``.
Production sites never set ``fault``; without it :func:`fault_injection_mod` changes nothing.

``nan-weights``: training runs as usual, then every floating-point weight in the reply is NaN.
``malformed``: every training and evaluation reply is broken after the site computed it by a
mutation of :data:`MUTATIONS` for its message type: wrong dtypes, shapes and keys, values out
of range, wrong types in its records. The node counts its messages in its state and takes
every ``MUTATION_STRIDE``-th mutation in turn, so that a short run meets different kinds. The
server's fuzz test (``tests/test_fuzz_replies.py``) sends the same ones and more.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable

FAULT_KEY = "fault"
NAN_WEIGHTS = "nan-weights"
MALFORMED = "malformed"
FAULTS = (NAN_WEIGHTS, MALFORMED)
COUNTER_RECORD = "fault-injection"
MUTATION_STRIDE = 5  # coprime to the number of mutations of each message type

# A mutation breaks a reply's content in place.
Mutation = Callable[[RecordDict], None]


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the node's configured fault to its training (and, ``malformed``, evaluation)
    replies."""
    fault = context.node_config.get(FAULT_KEY)
    if fault is None:
        return call_next(msg, context)
    if fault not in FAULTS:
        raise ValueError(f"node_config {FAULT_KEY}={fault!r}: the faults are {FAULTS}")
    reply = call_next(msg, context)
    kind = msg.metadata.message_type
    if reply.has_error():
        return reply
    if fault == NAN_WEIGHTS and kind.split(".")[0] == MessageType.TRAIN:
        for name, record in reply.content.array_records.items():
            reply.content[name] = ArrayRecord({key: Array(_nan_like(array.numpy()))
                                               for key, array in record.items()})
    elif fault == MALFORMED and kind in MUTATIONS:
        counters = context.state.config_records.get(COUNTER_RECORD, ConfigRecord())
        sent = int(counters.get(kind, 0))
        mutations = list(MUTATIONS[kind].values())
        mutations[sent * MUTATION_STRIDE % len(mutations)](reply.content)
        counters[kind] = sent + 1
        context.state[COUNTER_RECORD] = counters
    return reply


def _nan_like(array: np.ndarray) -> np.ndarray:
    return np.full_like(array, np.nan) if np.issubdtype(array.dtype, np.floating) else array


def _tensors(change: Callable[[str, np.ndarray], np.ndarray]) -> Mutation:
    """Every tensor of the update replaced by ``change(key, array)``."""
    def mutate(content: RecordDict) -> None:
        record = content["arrays"]
        content["arrays"] = ArrayRecord({key: Array(change(key, array.numpy()))
                                         for key, array in record.items()})

    return mutate


def _first_tensor(change: Callable[[np.ndarray], np.ndarray | Array | None]) -> Mutation:
    """The first tensor of the update replaced by ``change(array)`` (None: removed)."""
    def mutate(content: RecordDict) -> None:
        record = content["arrays"]
        key = next(iter(record))
        changed = change(record[key].numpy())
        arrays = ArrayRecord({k: v for k, v in record.items() if k != key})
        if changed is not None:
            arrays[key] = changed if isinstance(changed, Array) else Array(changed)
        content["arrays"] = arrays

    return mutate


def _lying_array(array: np.ndarray) -> Array:
    """An Array whose metadata says float32 of the right shape, its bytes int64."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(array.shape, np.int64), allow_pickle=False)
    return Array(dtype="float32", shape=tuple(array.shape), stype="numpy.ndarray",
                 data=buffer.getvalue())


def _key(values: Mapping[str, object], suffix: str) -> str:
    """The key of a record ending in ``suffix``."""
    key = next((k for k in values if k.endswith(suffix)), None)
    if key is None:
        raise ValueError(f"fault injection: no key ending in {suffix!r} to break")
    return key


def _set(record: str, key_suffix: str, value: object) -> Mutation:
    """The value of the key of ``record`` ending in ``key_suffix`` (added if there is none)."""
    def mutate(content: RecordDict) -> None:
        values = content[record]
        values[next((k for k in values if k.endswith(key_suffix)), key_suffix)] = value

    return mutate


def _delete(record: str, key_suffix: str | None = None) -> Mutation:
    """A record removed, or the key of it ending in ``key_suffix``."""
    def mutate(content: RecordDict) -> None:
        if key_suffix is None:
            del content[record]
        else:
            del content[record][_key(content[record], key_suffix)]

    return mutate


def _change(record: str, key_suffix: str, change: Callable[[object], object]) -> Mutation:
    def mutate(content: RecordDict) -> None:
        values = content[record]
        key = _key(values, key_suffix)
        values[key] = change(values[key])

    return mutate


def _as_config(record: str) -> Mutation:
    """A metric record sent as a config record with the same values."""
    def mutate(content: RecordDict) -> None:
        content[record] = ConfigRecord(dict(content[record]))

    return mutate


def _extra_record(content: RecordDict) -> None:
    content["surprise"] = MetricRecord({"x": 1.0})


def _negative_variance(content: RecordDict) -> None:
    """Every BatchNorm running variance of the update set to -1."""
    record = content["arrays"]
    _key(record, "running_var")  # there is one to break
    content["arrays"] = ArrayRecord({
        key: Array(np.full_like(array.numpy(), -1.0)) if key.endswith("running_var") else array
        for key, array in record.items()})


SITE_MUTATIONS: dict[str, Mutation] = {
    "bytes-centre": _set("site", "centre", b"clinic-a"),
    "list-centre": _set("site", "centre", ["clinic-a", "clinic-b"]),
    "unknown-centre": _set("site", "centre", "nowhere"),
    "no-site-record": _delete("site"),
    "extra-record": _extra_record,
}
# Message type -> named mutations of its reply.
MUTATIONS: dict[str, dict[str, Mutation]] = {
    MessageType.TRAIN: {
        "integer-weights": _tensors(lambda k, a: np.full(a.shape, 10**9, np.int64)),
        "complex-weights": _tensors(lambda k, a: a.astype(np.complex64)),
        "string-weights": _tensors(lambda k, a: np.full(a.shape, "x")),
        "structured-weights": _tensors(lambda k, a: np.zeros(a.shape, [("x", "<f4")])),
        "big-endian-weights": _tensors(lambda k, a: a.astype(a.dtype.newbyteorder(">"))),
        "huge-weights": _tensors(lambda k, a: a + np.asarray(1e6, a.dtype)),
        "negative-variance": _negative_variance,
        "wrong-shape": _first_tensor(lambda a: a.reshape(-1)[:-1] if a.size else a[None]),
        "lying-metadata": _first_tensor(_lying_array),
        "missing-tensor": _first_tensor(lambda a: None),
        "no-arrays": _delete("arrays"),
        "no-metrics": _delete("metrics"),
        "huge-num-examples": _set("metrics", "num-examples", 10**12),
        "zero-num-examples": _set("metrics", "num-examples", 0),
        "negative-num-examples": _set("metrics", "num-examples", -5),
        "float-num-examples": _set("metrics", "num-examples", 10.5),
        "nan-loss": _set("metrics", "train_loss", float("nan")),
        "negative-loss": _set("metrics", "train_loss", -1.0),
        "extra-metric": _set("metrics", "surprise", 1.0),
        "missing-metric": _delete("metrics", "train_loss"),
        "metrics-as-config": _as_config("metrics"),
        "string-class-counts": _set("site", "class-counts", "1,2,3"),
        "negative-class-counts": _set("site", "class-counts", [-1] * 5),
        **SITE_MUTATIONS,
    },
    MessageType.EVALUATE: {
        "nan-macro-f1": _set("metrics", "_macro_f1", float("nan")),
        "huge-macro-f1": _set("metrics", "_macro_f1", 1e9),
        "negative-loss": _set("metrics", "_loss", -1.0),
        "negative-confusion": _change("metrics", "_confusion_matrix",
                                      lambda m: [-1, *m[1:]]),
        "short-confusion": _change("metrics", "_confusion_matrix", lambda m: m[:-1]),
        "confusion-not-adding-up": _change("metrics", "_confusion_matrix",
                                           lambda m: [m[0] + 1, *m[1:]]),
        "short-histogram": _change("metrics", "_correct_by_confidence", lambda h: h[:-1]),
        "shares-not-adding-up": _change("metrics", "_correct_by_confidence",
                                        lambda h: [h[0] + 0.5, *h[1:]]),
        "huge-num-examples": _set("metrics", "num-examples", 10**12),
        "missing-metric": _delete("metrics", "_loss"),
        "extra-metric": _set("metrics", "surprise", 1.0),
        "no-metrics": _delete("metrics"),
        "metrics-as-config": _as_config("metrics"),
        "nan-seconds": _set("metrics", "eval_seconds", float("nan")),
        **SITE_MUTATIONS,
    },
}
