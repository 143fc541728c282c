"""cytofed ServerApp: aggregate site updates, evaluate on the held-out centre, report.

The run config is validated before anything else (a bad value stops the run with the field
named), the held-out centre never trains, every round is checkpointed, and a restarted
ServerApp with the same config resumes after the last completed round. The run's method
(``common.methods``) aggregates through ``server.strategies.MethodStrategy``; at the end every
site scores the selected model on its test split, reported beside the held-out centre.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.averaging import ExportedModels
from common.config import parse_run_config, resolve_centres, training_centres
from common.methods import create_method
from common.pipeline import new_model
from common.privacy import untrained_keys
from common.stain_sharing import pack_pool
from common.weights import model_state
from server.calibration import end_of_run
from server.federation import RoundResult, exchange, run_rounds
from server.held_out import open_held_out
from server.privacy import LEDGER_FILE, PrivacyLedger, private_updates
from server.production import refuse_synthetic_in_production
from server.recorder import RunRecorder
from server.replies import BadReply, Expected, check_reply
from server.stain_sharing import share_stain_styles
from server.strategies import create_strategy, record_to_state, state_to_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured federation and write ``<output-dir>/<time>-<run-name>/``."""
    config = parse_run_config(context.run_config)
    refuse_synthetic_in_production(config, grid)
    centres = resolve_centres(config)
    training = [c.name for c in training_centres(config, centres)]
    held_out_spec = next(c for c in centres if c.name == config.held_out)
    held_out = open_held_out(config, held_out_spec, training_centres(config, centres), grid)
    grid = held_out.training_grid  # without the evaluator site, which never trains
    method = create_method(config)
    model = new_model(config, len(held_out.classes))
    expected = Expected(len(held_out.classes), frozenset(training), config.held_out,
                        config.max_site_images)
    strategy = create_strategy(config, method, method.sent_keys(model), expected)
    dp = private_updates(strategy, config, len(training), untrained_keys(model))
    recorder = RunRecorder(config, held_out.classes, held_out_spec.taxonomy, training,
                           held_out_data=held_out.stats)
    if dp:  # every release is ledgered before it leaves; a resumed run replays the ledger
        dp.use_ledger(PrivacyLedger(recorder.path / LEDGER_FILE), recorder.rounds)
    state = model_state(model)
    if recorder.checkpoint is not None:
        state = {key: recorder.checkpoint[key] for key in state}  # the model's order
        print(f"[cytofed] resuming {recorder.path} after round {recorder.completed}",
              flush=True)

    exported_models = ExportedModels(config.average_last_rounds, recorder.path,
                                     recorder.completed)

    def global_model(arrays: ArrayRecord) -> ArrayRecord:
        return state_to_record(exported_models.preview(method.global_model(
            record_to_state(arrays))))

    def evaluate(server_round: int, arrays: ArrayRecord) -> dict[str, dict | None]:
        if not recorder.scores_held_out(server_round):
            return {"held_out": None, "held_out_bn_adapted": None}
        return held_out.evaluate(server_round, model, arrays)

    def finish_round(result: RoundResult, arrays: ArrayRecord, exported: ArrayRecord) -> None:
        record = {**result.to_dict(), **({"privacy": dp.round_privacy()} if dp else {})}
        if record["held_out"] is None and recorder.scores_held_out(result.round,
                                                                   result.validation):
            started = time.perf_counter()  # the round becomes the selected one
            record.update(held_out.evaluate(result.round, model, exported))
            record["held_out_seconds"] = time.perf_counter() - started
            record["seconds"] += record["held_out_seconds"]
        exported_models.commit(result.round, method.global_model(record_to_state(arrays)))
        recorder.complete_round(record, record_to_state(arrays), record_to_state(exported))

    train_config = ConfigRecord({})
    extras = {}
    rejected: list[dict] = []  # replies refused outside the rounds
    if config.class_prior == "federated":
        counts = federated_class_counts(grid, expected, config.round_timeout, rejected)
        if counts is not None:
            train_config["federated-counts"] = counts.tolist()
    if config.stain_sharing:
        styles, extras["stain_sharing"] = share_stain_styles(grid, config.round_timeout)
        if styles:
            train_config.update(pack_pool(styles))
    final = run_rounds(dp or strategy, grid, state_to_record(state), recorder.completed + 1,
                       config.num_server_rounds, train_config, global_model, evaluate,
                       finish_round, config.round_timeout)
    best = state_to_record(recorder.best_state())
    refused_in_rounds = len(strategy.rejected)
    end = end_of_run(dp or strategy, grid, best, config.num_server_rounds, config.round_timeout,
                     lambda temperature: held_out.evaluate(recorder.best_round, model, best,
                                                           temperature))
    extras["rejected_replies"] = rejected + strategy.rejected[refused_in_rounds:]
    if dp:
        extras["privacy"] = dp.privacy_report()
    recorder.finish(exported_models.current(method.global_model(record_to_state(final))),
                    end, extras)


def federated_class_counts(grid: Grid, expected: Expected, timeout: float,
                           rejected: list[dict]) -> np.ndarray | None:
    """Summed training class counts of all sites, or None unless every site allows sharing
    and sends counts that fit the run (``server.replies``: one count per class, none
    negative, at most ``max-site-images`` in all); a reply that does not is added to
    ``rejected``."""
    nodes = list(grid.get_node_ids())
    replies = exchange(grid, [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                message_type="query.class_counts") for node in nodes], timeout)
    configs = []
    for reply in replies:
        if reply.has_error():
            continue
        try:
            configs.append(check_reply(reply, "class_counts", expected)["config"])
        except BadReply as problem:
            rejected.append({"node_id": reply.metadata.src_node_id, "reply": "class_counts",
                             "reason": str(problem)})
            print(f"[cytofed] class counts of node {reply.metadata.src_node_id} rejected: "
                  f"{problem}", flush=True)
    if len(configs) < len(nodes) or not all(c["share-counts"] for c in configs):
        print("[cytofed] not every site shares usable class counts: using local priors",
              flush=True)
        return None
    return np.sum([np.asarray(c["counts"], dtype=np.int64) for c in configs], axis=0)


def build_server_app(overrides: Mapping[str, Any]) -> ServerApp:
    """A ServerApp running :func:`main` with ``overrides`` merged over the run config
    (``flwr.simulation.run_simulation`` hands the apps an empty one)."""
    server_app = ServerApp()

    @server_app.main()
    def main_with_overrides(grid: Grid, context: Context) -> None:
        main(grid, replace(context, run_config={**context.run_config, **overrides}))

    return server_app
