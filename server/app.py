"""cytofed ServerApp: aggregate site updates, evaluate on the held-out centre, report.

The run config is validated before anything else (a bad value stops the run with the field
named), the held-out centre never trains, every round is checkpointed, and a restarted
ServerApp with the same config resumes after the last completed round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, parse_run_config, resolve_centres, training_centres
from common.models import batchnorm_keys
from common.pipeline import load_centre_data, new_model
from common.privacy import untrained_keys
from common.train import images_on_device, resolve_device
from common.weights import model_state, save_weights
from server.evaluation import evaluate_held_out
from server.export import export_model
from server.federation import RoundResult, exchange, run_rounds
from server.privacy import LEDGER_FILE, PrivacyLedger, private_updates
from server.report import write_report
from server.rundir import RunDirectory
from server.strategies import create_strategy, record_to_state, state_to_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured federation and write ``<output-dir>/<time>-<run-name>/``."""
    config = parse_run_config(context.run_config)
    centres = resolve_centres(config)
    held_out_spec = next(c for c in centres if c.name == config.held_out)
    held_out = load_centre_data(held_out_spec, config)
    model = new_model(config, len(held_out.classes))
    bn_keys = batchnorm_keys(model)
    strategy = create_strategy(config, bn_keys)
    dp = private_updates(strategy, config, len(training_centres(config, centres)),
                         untrained_keys(model))
    run = RunDirectory.open(Path(config.output_dir), config.run_name, config.to_dict())
    saved, rounds, completed = run.resume()
    if dp:  # every release is ledgered before it leaves; a resumed run replays the ledger
        dp.use_ledger(PrivacyLedger(run.path / LEDGER_FILE), rounds)
    state = model_state(model)
    if saved is not None:
        state = {key: saved[key] for key in state}  # the model's order, as clipping expects
        print(f"[cytofed] resuming {run.path} after round {completed}", flush=True)
    metadata = {"config": config.to_dict(), "classes": list(held_out.classes)}

    held_out_images = images_on_device(held_out.images, resolve_device(config.device))

    def evaluate(server_round: int, arrays) -> dict[str, dict | None]:
        return evaluate_held_out(model, record_to_state(arrays), held_out, config,
                                 held_out_images)

    def finish_round(result: RoundResult, arrays) -> None:
        state = record_to_state(arrays)
        if all(_validation_f1(result.to_dict()) >= _validation_f1(r) for r in rounds):
            save_weights(run.path / "best.safetensors", state,
                         {**metadata, "round": result.round})
        rounds.append({**result.to_dict(), **({"privacy": dp.round_privacy()} if dp else {})})
        run.complete_round(rounds, state)
        print(f"[cytofed] round {result.round}/{config.num_server_rounds}: "
              f"train loss {result.train.get('train_loss', float('nan')):.4f}, "
              f"sites' val macro-F1 {result.validation.get('val_macro_f1', float('nan')):.3f}, "
              f"held-out macro-F1 {result.held_out['macro_f1']:.3f}{_bn_adapted(result)} "
              f"({result.replied}/{result.sampled} sites, {result.seconds:.1f}s)", flush=True)

    train_config = ConfigRecord({})
    if config.class_prior == "federated":
        counts = federated_class_counts(grid, len(held_out.classes), config.round_timeout)
        if counts is not None:
            train_config["federated-counts"] = counts.tolist()
    final_arrays = run_rounds(dp or strategy, grid, state_to_record(state), completed + 1,
                              config.num_server_rounds, train_config, evaluate, finish_round,
                              config.round_timeout)
    save_weights(run.path / "final.safetensors", record_to_state(final_arrays), metadata)
    report_path = finalise(run, config, held_out.classes, held_out_spec.taxonomy,
                           [c.name for c in training_centres(config, centres)], rounds,
                           dp.privacy_report() if dp else None)
    final = rounds[-1]["held_out"]
    print(f"[cytofed] held-out centre {config.held_out}: macro-F1 {final['macro_f1']:.3f}, "
          f"balanced accuracy {final['balanced_accuracy']:.3f}", flush=True)
    print(f"[cytofed] report: {report_path}", flush=True)
    run.save_progress(rounds, finished=True)


def federated_class_counts(grid: Grid, num_classes: int,
                           timeout: float) -> np.ndarray | None:
    """Summed training class counts of all sites, or None unless every site allows sharing."""
    nodes = list(grid.get_node_ids())
    replies = exchange(grid, [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                message_type="query.class_counts") for node in nodes], timeout)
    configs = [m.content["config"] for m in replies if not m.has_error()]
    if len(configs) < len(nodes) or not all(c["share-counts"] for c in configs):
        print("[cytofed] not every site shares class counts: using local priors", flush=True)
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


def _bn_adapted(result: RoundResult) -> str:
    adapted = result.held_out_bn_adapted
    return f" (BN-adapted {adapted['macro_f1']:.3f})" if adapted else ""


def _validation_f1(round_result: dict) -> float:
    return round_result["validation"].get("val_macro_f1", -1.0)


def _held_out_results(round_result: dict) -> dict:
    """Plain and test-time-BN-adapted held-out metrics of a round (the latter may be None)."""
    return {"held_out": round_result["held_out"],
            "held_out_bn_adapted": round_result.get("held_out_bn_adapted")}


def finalise(run: RunDirectory, config: RunConfig, classes: tuple[str, ...], taxonomy: str,
             training: list[str], rounds: list[dict], privacy: dict | None = None) -> Path:
    """Write the model card and the report; the best round (exported as the model) is the
    latest with the top sites' validation F1."""
    best = max(rounds, key=lambda r: (_validation_f1(r), r["round"]))
    report = {
        "run_name": config.run_name, "run_dir": str(run.path), "config": config.to_dict(),
        "classes": list(classes), "held_out_centre": config.held_out,
        "training_centres": training, "rounds": rounds,
        "final": {"round": rounds[-1]["round"], **_held_out_results(rounds[-1])},
        "best": {"round": best["round"], "selected_by": "sites' validation macro-F1",
                 **_held_out_results(best)},
        "held_out_macro_f1": rounds[-1]["held_out"]["macro_f1"],
    }
    if privacy:
        report["privacy"] = privacy
    report["model"] = export_model(run.path, report, taxonomy)
    return write_report(run.path, report)
