"""The held-out evaluator site: a SuperNode that scores the global model on its own images.

Started with ``cytofed site --role evaluator`` (node config ``role='evaluator'``), it answers
``evaluate.held_out`` (the global weights and a temperature in; out the metrics of
:func:`common.pipeline.score_held_out`, exactly what the server computes in simulation:
confusion matrix, per-class F1, calibration bins, confidence histograms) and ``query.role``.
:func:`site_role_mod` refuses every other message, so it never trains and never sends
weights; a training site (the default role) refuses ``evaluate.held_out``. Refusals and
failures name no path: details stay in the site's own log.
"""

from __future__ import annotations

import functools
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from torch import nn

from client.site import site_centre
from common.calibration import checked_temperature
from common.config import RunConfig, parse_run_config
from common.data import CentreData, CentreSpec
from common.evaluator_protocol import (
    EVALUATOR,
    HELD_OUT_MESSAGE,
    ROLE_KEY,
    ROLE_QUERY,
    ROLES,
    TRAIN,
    encode_held_out,
)
from common.pipeline import load_centre_data, new_model, place, score_held_out
from common.weights import load_state


def node_role(node_config: Mapping) -> str:
    """The node's role: ``train`` unless its node config says ``role='evaluator'``."""
    role = str(node_config.get(ROLE_KEY, TRAIN))
    if role not in ROLES:
        raise ValueError(f"node_config {ROLE_KEY}={role!r}: expected one of {ROLES}")
    return role


def site_role_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Pass on only the messages the node's role answers; refuse the others."""
    kind = msg.metadata.message_type
    try:
        role = node_role(context.node_config)
    except ValueError as error:
        return refusal(msg, str(error))
    if kind == ROLE_QUERY:
        return call_next(msg, context)
    if role == EVALUATOR and kind != HELD_OUT_MESSAGE:
        return refusal(msg, f"the held-out evaluator site answers no {kind!r} message: it "
                            "never trains and never sends weights")
    if role == TRAIN and kind == HELD_OUT_MESSAGE:
        return refusal(msg, "a training site does not evaluate the held-out centre")
    return call_next(msg, context)


def refusal(msg: Message, reason: str) -> Message:
    """An error reply that names no path."""
    return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)


def failing_quietly(handler: Callable[[Message, Context], Message]) -> ClientAppCallable:
    """``handler``, whose exceptions are logged at the site and answered without detail."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as error:  # the site's log keeps the whole error
            traceback.print_exc(file=sys.stderr)
            return refusal(msg, f"{msg.metadata.message_type} failed at the site "
                                f"({type(error).__name__}; details in the site's log)")

    return wrapped


@dataclass
class HeldOutSite:
    """The evaluator's centre, kept by its process between messages."""

    config: RunConfig
    spec: CentreSpec
    data: CentreData

    @functools.cached_property
    def model(self) -> nn.Module:
        return new_model(self.config, len(self.data.classes))

    @functools.cached_property
    def images(self) -> torch.Tensor:
        return place(self.data, self.config)


def open_held_out_site(context: Context) -> HeldOutSite:
    """The evaluator site of this node for the run described by ``context``."""
    node_config = tuple(sorted(dict(context.node_config).items()))
    return _open_held_out_site(parse_run_config(context.run_config), node_config)


@functools.lru_cache(maxsize=2)
def _open_held_out_site(config: RunConfig, node_config: tuple) -> HeldOutSite:
    spec = site_centre(config, dict(node_config))
    if spec.name != config.held_out:
        raise ValueError(f"this evaluator site holds centre {spec.name!r} but the run holds "
                         f"out {config.held_out!r}")
    return HeldOutSite(config, spec, load_centre_data(spec, config))


@failing_quietly
def evaluate_held_out(msg: Message, context: Context) -> Message:
    """Metrics of the global weights at the server's temperature (1 unless it sends one) on
    every image of the held-out centre."""
    site = open_held_out_site(context)
    started = time.perf_counter()
    config = msg.content.config_records.get("config", {})
    temperature = checked_temperature(config.get("temperature", 1.0), "the server's 'temperature'")
    load_state(site.model, {key: array.numpy() for key, array in msg.content["arrays"].items()})
    result = score_held_out(site.model, site.data, site.config, site.images, temperature)
    record = ConfigRecord({"centre": site.spec.name, "metrics": encode_held_out(result),
                           "seconds": time.perf_counter() - started})
    return Message(RecordDict({"held-out": record}), reply_to=msg)


@failing_quietly
def site_role(msg: Message, context: Context) -> Message:
    """This node's role and the name of its centre."""
    role = node_role(context.node_config)
    centre = site_centre(parse_run_config(context.run_config), dict(context.node_config))
    record = ConfigRecord({"role": role, "centre": centre.name})
    return Message(RecordDict({"role": record}), reply_to=msg)


def register_role_handlers(client_app: ClientApp) -> None:
    """Add the evaluator's message and the role query to ``client_app``."""
    client_app.evaluate(HELD_OUT_MESSAGE.split(".")[1])(evaluate_held_out)
    client_app.query(ROLE_QUERY.split(".")[1])(site_role)
