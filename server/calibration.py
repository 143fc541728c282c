"""The end of a federated run: federated temperature scaling, then the selected model at that
temperature on every site's validation and test splits.

Two phases after the last round, each one exchange with every training site:

1. ``evaluate.temperature_curve``: each site sends its validation NLL of the selected model at
   every temperature of ``common.calibration.TEMPERATURES`` (numbers only); the server sums
   the curves and picks the temperature (``pick_temperature``: the pooled optimum);
2. ``evaluate`` with ``split`` ``val`` and ``test`` and that ``temperature``: each site's
   aggregate report (``common.selection.site_report``), so the ``uncertain`` threshold comes
   from validation confidence histograms at the temperature the exported model uses, and the
   in-distribution test is scored as the model is applied.

A site whose curve is malformed, or that fails, is left out and listed; the run goes on (at
temperature 1 when no curve is usable).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.calibration import CURVE_MESSAGE, CURVE_RECORD, NllCurve, pick_temperature
from server.federation import exchange
from server.privacy import PrivateUpdates
from server.recorder import EndOfRun
from server.replies import error_reason
from server.strategies import MethodStrategy


def temperature_curves(grid: Grid, arrays: ArrayRecord,
                       timeout: float) -> tuple[dict[str, NllCurve], list[dict]]:
    """Each answering site's validation NLL curve of ``arrays``, by centre, and the sites left
    out (node and reason)."""
    nodes = list(grid.get_node_ids())
    sent = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({})}),
                    dst_node_id=node, message_type=CURVE_MESSAGE) for node in nodes]
    replies = exchange(grid, sent, timeout)
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    curves: dict[str, NllCurve] = {}
    left_out = [{"node_id": node, "reason": "no reply before the round timeout"}
                for node in set(node_of.values()) - {
                    node_of.get(r.metadata.reply_to_message_id) for r in replies}]
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        try:
            centre, curve = _curve(reply, node)
        except ValueError as error:
            left_out.append({"node_id": node, "reason": str(error)})
            continue
        if centre in curves:
            left_out.append({"node_id": node, "reason": f"a second curve for {centre!r}"})
            continue
        curves[centre] = curve
    return curves, sorted(left_out, key=lambda item: item["node_id"])


def _curve(reply: Message, node: int) -> tuple[str, NllCurve]:
    """The centre and checked curve of one reply; ValueError says what is wrong."""
    if reply.has_error():
        raise ValueError(error_reason(reply))  # a site code: the site's own text stays there
    record = reply.content.metric_records.get(CURVE_RECORD)
    if record is None:
        raise ValueError("its reply holds no temperature curve (empty validation split?)")
    centre = str(reply.content.config_records.get("site", {}).get("centre", f"node {node}"))
    return centre, NllCurve.from_dict(dict(record), f"temperature curve of node {node}")


def score_at_temperature(strategy: MethodStrategy | PrivateUpdates, grid: Grid,
                         arrays: ArrayRecord, server_round: int, timeout: float,
                         temperature: float) -> dict[str, list[dict]]:
    """Every answering site's ``val`` and ``test`` reports of ``arrays`` at ``temperature``
    (aggregate counts only), with its centre's name, by split; one exchange. Reports are
    checked against their schema (``server.replies``); the strategy's ``rejected`` lists
    those that fail."""
    sent = {split: list(strategy.configure_evaluate(
        server_round, arrays, ConfigRecord({"split": split, "temperature": temperature}), grid))
        for split in ("val", "test")}
    replies = exchange(grid, [m for ms in sent.values() for m in ms], timeout)
    split_of = {m.metadata.message_id: split for split, ms in sent.items() for m in ms}
    return {split: strategy.site_reports(
        [r for r in replies if split_of.get(r.metadata.reply_to_message_id) == split], split)
        for split in sent}


def end_of_run(strategy: MethodStrategy | PrivateUpdates, grid: Grid, arrays: ArrayRecord,
               server_round: int, timeout: float,
               score_held_out: Callable[[float], dict[str, dict | None]]) -> EndOfRun:
    """Both phases for the selected weights ``arrays``, and ``score_held_out(temperature)``:
    the held-out centre's metrics of the same weights at the chosen temperature."""
    curves, left_out = temperature_curves(grid, arrays, timeout)
    temperature = pick_temperature(list(curves.values())) if curves else 1.0
    reports = score_at_temperature(strategy, grid, arrays, server_round, timeout, temperature)
    return EndOfRun(temperature, curves, reports["val"], reports["test"],
                    score_held_out(temperature), left_out)
