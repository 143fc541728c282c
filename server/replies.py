"""One schema for every reply the server reads, checked before anything is aggregated or stored.

A site is not trusted: whatever it sends is checked here first, and a reply that fails is
rejected with its reason (the round goes on with the others). Every kind of reply is one
:class:`ReplySchema` in :data:`SCHEMAS`: the records it must hold (no more, no fewer, each of
its Flower type) and, per record, its keys (:class:`Field`: a check and whether the key may be
absent) and the rules across its keys or records. A new message kind is one entry in
:data:`SCHEMAS`; a new metric is one :class:`Field` in its record.

:func:`check_reply` checks the metric and config records and returns them as plain dicts.
:func:`check_update` checks a model update against the global model one tensor at a time
(keys, the wire dtype and shape, decoding, finite values, non-negative BatchNorm variances) and
returns its L2 distance to the global model without keeping any tensor. :func:`error_reason`
is what the server stores of a failed site's error: one of the site codes
(``client.errors.CODES``), a reason of the SuperLink itself, or :data:`UNRECOGNISED_ERROR`.

Reasons name keys and values only when they are short and plain (:func:`describe`): a site's
text never reaches the progress file or the report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import (
    MESSAGE_UNAVAILABLE_ERROR_REASON,
    NODE_UNAVAILABLE_ERROR_REASON,
    REPLY_MESSAGE_UNAVAILABLE_ERROR_REASON,
)

from client.errors import CODES
from common.evaluator_protocol import MAX_BYTES, ROLES
from common.metrics import CONFIDENCE_BINS
from common.selection import WEIGHT_KEY
from common.weights import from_wire, to_wire

UNRECOGNISED_ERROR = "site-error:unrecognised"  # stored instead of any other error text
SUPERLINK_REASONS = frozenset({NODE_UNAVAILABLE_ERROR_REASON, MESSAGE_UNAVAILABLE_ERROR_REASON,
                               REPLY_MESSAGE_UNAVAILABLE_ERROR_REASON})
LARGEST_NUMBER = 1e9  # no loss, rate or duration a site sends is larger
LARGEST_UPDATE_BYTES = 2**40
HISTOGRAM_TOLERANCE = 1e-3  # a histogram of shares sums to 1 within this
PLAIN = re.compile(r"[A-Za-z0-9_.:\-]{1,48}")  # text a reason may quote


class BadReply(ValueError):
    """A reply that does not fit its schema; the message is the reason that is stored."""


@dataclass(frozen=True)
class Expected:
    """What this run lets a reply hold."""

    num_classes: int
    centres: frozenset[str]  # the training centres
    held_out: str
    max_images: int  # the most images one site may report (run config ``max-site-images``)


# A check returns None when the value fits, else what was expected.
Check = Callable[[Any, Expected], str | None]
# A rule across the checked records of one reply (record name -> values): None or a problem.
Rule = Callable[[dict[str, dict], Expected], str | None]


@dataclass(frozen=True)
class Field:
    """One key of a record: its check and whether it may be absent."""

    check: Check
    required: bool = True

    def optional(self) -> Field:
        return Field(self.check, required=False)


@dataclass(frozen=True)
class RecordSpec:
    """A metric or config record and its keys (no others)."""

    kind: type[MetricRecord] | type[ConfigRecord]
    fields: Mapping[str, Field]


@dataclass(frozen=True)
class ReplySchema:
    """A reply: its metric and config records, its model updates (``ArrayRecord`` names, see
    :func:`check_update`) and rules across records."""

    records: Mapping[str, RecordSpec]
    updates: frozenset[str] = frozenset()
    rules: tuple[Rule, ...] = field(default=())


def describe(value: Any) -> str:
    """A value as a reason may show it: numbers as they are, plain short text quoted, the
    rest by its type and size only."""
    if type(value) in (bool, int, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if PLAIN.fullmatch(value) else f"a text of {len(value)} characters"
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {len(value)} values ({', '.join(kinds) or 'empty'})"
    return f"a {type(value).__name__}"


def _names(keys: Any) -> str:
    keys = sorted(str(k) for k in keys)
    shown = [repr(k) if PLAIN.fullmatch(k) else "(a key that is not plain text)"
             for k in keys[:3]]
    return "[" + ", ".join(shown) + (f", and {len(keys) - 3} more" if len(keys) > 3 else "") + "]"


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def number(low: float = 0.0, high: float = LARGEST_NUMBER) -> Field:
    """A finite int or float in [low, high]."""
    def check(value: Any, _: Expected) -> str | None:
        return None if _is_number(value) and low <= value <= high else (
            f"a finite number in [{low:g}, {high:g}]")

    return Field(check)


def count(low: int = 0, high: Callable[[Expected], int] | int = LARGEST_UPDATE_BYTES) -> Field:
    """An int in [low, high] (``high`` may depend on the run, e.g. ``max-site-images``)."""
    def check(value: Any, expected: Expected) -> str | None:
        top = high(expected) if callable(high) else high
        return None if type(value) is int and low <= value <= top else (
            f"an integer in [{low}, {top}]")

    return Field(check)


def counts(length: Callable[[Expected], int]) -> Field:
    """A list of ``length`` ints, each in [0, max-site-images]."""
    def check(value: Any, expected: Expected) -> str | None:
        size = length(expected)
        fits = (isinstance(value, list) and len(value) == size
                and all(type(v) is int and 0 <= v <= expected.max_images for v in value))
        return None if fits else f"{size} integers in [0, {expected.max_images}]"

    return Field(check)


def shares(length: int = CONFIDENCE_BINS) -> Field:
    """A list of ``length`` numbers in [0, 1]."""
    def check(value: Any, _: Expected) -> str | None:
        fits = (isinstance(value, list) and len(value) == length
                and all(_is_number(v) and 0 <= v <= 1 for v in value))
        return None if fits else f"{length} numbers in [0, 1]"

    return Field(check)


def centre(names: Callable[[Expected], frozenset[str]] = lambda e: e.centres) -> Field:
    """The name of one of the run's centres."""
    def check(value: Any, expected: Expected) -> str | None:
        return None if isinstance(value, str) and value in names(expected) else (
            f"one of the centres {sorted(names(expected))}")

    return Field(check)


def one_of(*options: Any) -> Field:
    def check(value: Any, _: Expected) -> str | None:
        return None if type(value) in (str, bool) and value in options else (
            f"one of {list(options)}")

    return Field(check)


def text(max_characters: int) -> Field:
    def check(value: Any, _: Expected) -> str | None:
        return None if isinstance(value, str) and len(value) <= max_characters else (
            f"a text of at most {max_characters} characters")

    return Field(check)


RATE, LOSS, SECONDS = number(0.0, 1.0), number(), number()
IMAGES = count(0, lambda e: e.max_images)
CONFUSION = counts(lambda e: e.num_classes**2)
CLASS_COUNTS = counts(lambda e: e.num_classes)


def split_report(split: str) -> dict[str, Field]:
    """The keys of a site's report on ``split`` (``common.selection.site_report``); only the
    confusion counts for an empty split."""
    return {f"{split}_confusion_matrix": CONFUSION, f"{split}_macro_f1": RATE.optional(),
            f"{split}_loss": LOSS.optional(),
            f"{split}_correct_by_confidence": shares().optional(),
            f"{split}_wrong_by_confidence": shares().optional(), WEIGHT_KEY: IMAGES}


def consistent_split(split: str, record: str = "metrics") -> Rule:
    """The confusion counts add up to the images; a non-empty split has every key and its
    histogram of shares sums to 1; an empty one has nothing but its zero counts."""
    def rule(records: dict[str, dict], _: Expected) -> str | None:
        values = records[record]
        images = values[WEIGHT_KEY]
        if sum(values[f"{split}_confusion_matrix"]) != images:
            return f"{split}_confusion_matrix does not add up to {WEIGHT_KEY} {images}"
        rest = set(split_report(split)) - {f"{split}_confusion_matrix", WEIGHT_KEY}
        if images == 0:
            sent = sorted(rest & set(values))
            return f"an empty split sends no {_names(sent)}" if sent else None
        if rest - set(values):
            return f"missing {_names(rest - set(values))} for {images} images"
        total = (sum(values[f"{split}_correct_by_confidence"])
                 + sum(values[f"{split}_wrong_by_confidence"]))
        if abs(total - 1) > HISTOGRAM_TOLERANCE:
            return f"the confidence shares of {split} sum to {total:.4g}, not 1"
        return None

    return rule


def counts_add_up(records: dict[str, dict], _: Expected) -> str | None:
    """A training reply's class counts, when sent, are those of its training images."""
    sent = records["site"].get("class-counts")
    images = records["metrics"][WEIGHT_KEY]
    if sent is not None and sum(sent) != images:
        return f"class-counts add up to {sum(sent)}, not {WEIGHT_KEY} {images}"
    return None


def counts_if_shared(records: dict[str, dict], expected: Expected) -> str | None:
    """Class counts come exactly when the site says it shares them, and fit one site."""
    values = records["config"]
    if values["share-counts"] != ("counts" in values):
        return "'counts' must come exactly when 'share-counts' is true"
    if "counts" in values and sum(values["counts"]) > expected.max_images:
        return f"the counts add up to more than max-site-images {expected.max_images}"
    return None


def _metrics(fields: dict[str, Field]) -> RecordSpec:
    return RecordSpec(MetricRecord, fields)


def _config(fields: dict[str, Field]) -> RecordSpec:
    return RecordSpec(ConfigRecord, fields)


SITE = _config({"centre": centre()})
TRAIN_METRICS = {"train_loss": LOSS, "images_per_second": number(), "train_seconds": SECONDS,
                 WEIGHT_KEY: count(1, lambda e: e.max_images), "update-bytes": count(),
                 "local_steps": count()}

# Reply kind -> its schema: what the server reads from each message it sends.
SCHEMAS: dict[str, ReplySchema] = {
    "train": ReplySchema(
        {"metrics": _metrics(TRAIN_METRICS),
         "site": _config({"centre": centre(), "class-counts": CLASS_COUNTS.optional()})},
        updates=frozenset({"arrays"}), rules=(counts_add_up,)),
    "val": ReplySchema({"metrics": _metrics({**split_report("val"), "eval_seconds": SECONDS}),
                        "site": SITE}, rules=(consistent_split("val"),)),
    "test": ReplySchema({"metrics": _metrics({**split_report("test"), "eval_seconds": SECONDS}),
                         "site": SITE}, rules=(consistent_split("test"),)),
    "class_counts": ReplySchema({"config": _config({
        "share-counts": one_of(True, False), "centre": centre(),
        "counts": CLASS_COUNTS.optional()})}, rules=(counts_if_shared,)),
    "role": ReplySchema({"role": _config({
        "role": one_of(*ROLES),
        "centre": centre(lambda e: e.centres | {e.held_out})})}),
    "held_out": ReplySchema({"held-out": _config({
        "centre": centre(lambda e: frozenset({e.held_out})), "metrics": text(MAX_BYTES),
        "seconds": SECONDS})}),
}


def check_reply(message: Message, kind: str, expected: Expected) -> dict[str, dict]:
    """The metric and config records of a reply of ``kind`` (see :data:`SCHEMAS`), checked,
    as plain dicts by record name; raises :class:`BadReply` with the first problem.

    Model updates are only checked to be present here (see :func:`check_update`).
    """
    schema = SCHEMAS[kind]
    if message.has_error():
        raise BadReply("the reply is an error")
    content = message.content
    sent = {name: type(record) for name, record in content.items()}
    wanted = {**{name: spec.kind for name, spec in schema.records.items()},
              **{name: ArrayRecord for name in schema.updates}}
    if set(sent) != set(wanted):
        raise BadReply(f"records differ from a {kind} reply's (unknown "
                       f"{_names(set(sent) - set(wanted))}, missing "
                       f"{_names(set(wanted) - set(sent))})")
    for name, kind_wanted in wanted.items():
        if sent[name] is not kind_wanted:
            raise BadReply(f"record {describe(name)} is a {sent[name].__name__}, expected a "
                           f"{kind_wanted.__name__}")
    records = {name: _check_record(name, dict(content[name]), spec, expected)
               for name, spec in schema.records.items()}
    for rule in schema.rules:
        if problem := rule(records, expected):
            raise BadReply(problem)
    return records


def _check_record(name: str, values: dict, spec: RecordSpec, expected: Expected) -> dict:
    unknown = set(values) - set(spec.fields)
    missing = {key for key, f in spec.fields.items() if f.required} - set(values)
    if unknown or missing:
        raise BadReply(f"{name} keys differ (unknown {_names(unknown)}, missing "
                       f"{_names(missing)})")
    for key, value in values.items():
        if (wanted := spec.fields[key].check(value, expected)) is not None:
            raise BadReply(f"{name} {key!r}: expected {wanted}, got {describe(value)}")
    return values


def wire_dtype(dtype: np.dtype, precision: str) -> np.dtype:
    """The dtype a tensor of ``dtype`` travels in at ``precision`` (``common.weights``)."""
    return to_wire({"x": np.zeros(0, dtype)}, precision)["x"].dtype


def decoded(array: Array, dtype: np.dtype, shape: tuple[int, ...], precision: str,
            key: str) -> np.ndarray:
    """One tensor of an update, from its wire ``dtype`` and ``shape`` to the global model's
    dtype; :class:`BadReply` when it is of another dtype or shape or cannot be decoded."""
    expected = f"expected {dtype} {shape}"
    if (array.stype != "numpy.ndarray" or array.dtype != str(dtype)
            or tuple(array.shape) != shape):
        raise BadReply(f"{key} is {_tensor(array.dtype, array.shape)}, {expected}")
    try:
        value = array.numpy()
    except Exception as error:  # a site's bytes: whatever numpy says, the reply is refused
        raise BadReply(f"{key} cannot be decoded as a numpy array ({type(error).__name__})"
                       ) from None
    if value.dtype != dtype or value.shape != shape:
        raise BadReply(f"{key} decodes to {_tensor(str(value.dtype), value.shape)}, {expected}")
    return from_wire({key: value}, precision)[key]


def _tensor(dtype: str, shape: Any) -> str:
    """A tensor's dtype and shape as a reason shows them."""
    dtype = dtype if PLAIN.fullmatch(str(dtype)) else "an unusual dtype"
    shape = tuple(shape)
    return f"{dtype} {shape}" if len(shape) <= 8 else f"{dtype} of {len(shape)} dimensions"


def check_update(record: ArrayRecord, reference: Mapping[str, np.ndarray],
                 precision: str) -> float:
    """The L2 distance of an update to the global ``reference`` (float32 differences, squared
    norms summed in float64), checked one tensor at a time: the same keys, each tensor in its
    wire dtype and shape, finite, BatchNorm variances non-negative. Raises :class:`BadReply`.
    """
    if set(record) != set(reference):
        raise BadReply(f"keys differ from the global model (unknown "
                       f"{_names(set(record) - set(reference))}, missing "
                       f"{_names(set(reference) - set(record))})")
    total = 0.0
    for key, value in reference.items():
        update = decoded(record[key], wire_dtype(value.dtype, precision), value.shape,
                         precision, key)
        if not np.all(np.isfinite(update)):
            raise BadReply(f"{key} contains NaN or Inf")
        if key.endswith("running_var") and np.any(update < 0):
            raise BadReply(f"{key} holds a negative variance")
        difference = np.subtract(update, value, dtype=np.float32).ravel()
        total += float(np.dot(difference, difference))
    return math.sqrt(total)


class WireState(Mapping[str, np.ndarray]):
    """The tensors of a checked update, decoded from the wire one at a time when read (a
    method reads one tensor of every update, then the next: see ``common.methods``)."""

    def __init__(self, record: ArrayRecord, reference: Mapping[str, np.ndarray],
                 precision: str) -> None:
        self.record, self.reference, self.precision = record, reference, precision

    def __getitem__(self, key: str) -> np.ndarray:
        reference = self.reference[key]
        return decoded(self.record[key], wire_dtype(reference.dtype, self.precision),
                       reference.shape, self.precision, key)

    def __iter__(self):
        return iter(self.reference)

    def __len__(self) -> int:
        return len(self.reference)


def error_reason(message: Message) -> str:
    """What the server stores of an error reply: a site code, a SuperLink's own reason, or
    :data:`UNRECOGNISED_ERROR` for anything else (whose text might name a site's files)."""
    reason = message.error.reason
    if reason in CODES:
        return reason
    if message.metadata.src_node_id == SUPERLINK_NODE_ID and reason in SUPERLINK_REASONS:
        return reason
    return UNRECOGNISED_ERROR
