"""Centralised references, trained in one place without Flower: ``pooled`` and ``local``.

``pooled`` trains one model on the concatenated training splits of every training centre (what
privacy forbids); ``local`` one model per training centre on its own split (the method's
``partitions``, see ``common.methods``). Like a federated run they train
``num-server-rounds`` x ``local-epochs`` epochs, one :func:`common.pipeline.fit` call per
round (with ``local-steps``: that many steps per round per training centre pooled, so a pooled
model takes as many steps as all the federation's sites together), validate on their centres'
validation splits, score the held-out centre when a federated run would (``held-out-every``),
export the same average of the last rounds' models (``average-last-rounds``) and record
through ``server.recorder.RunRecorder``: the same progress line per round, the same run
directory (report, figures, best/final weights, model card, checkpoints), the same selection
rule (``common.selection.best_round``), the same temperature scaling (each centre's validation
NLL curve, summed) and the same in-distribution test on their centres' test splits at that
temperature. No Flower import.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.averaging import ExportedModels
from common.calibration import pick_temperature
from common.config import RunConfig, resolve_centres, training_centres
from common.data import CentreData
from common.duplicates import load_held_out
from common.methods import create_method
from common.pipeline import (
    centre_splits,
    fit,
    load_centre_data,
    new_model,
    place,
    round_seed,
    score_as_applied,
    score_held_out,
    temperature_curve,
)
from common.selection import combine_site_reports, site_report
from common.weights import load_state, model_state
from server.recorder import EndOfRun, RoundResult, RunRecorder


def concatenate(parts: list[CentreData], name: str) -> CentreData:
    """Several centres' images as one (groups renumbered so they stay apart)."""
    offsets = np.cumsum([0] + [int(p.groups.max(initial=-1)) + 1 for p in parts[:-1]])
    return CentreData(name, parts[0].classes, np.concatenate([p.images for p in parts]),
                      np.concatenate([p.labels for p in parts]),
                      np.concatenate([p.groups + o for p, o in zip(parts, offsets, strict=True)]))


def run_centralised(config: RunConfig) -> list[Path]:
    """Train ``config.strategy`` (``pooled`` or ``local``): one run directory per model, under
    ``<run-name>`` (one model) or ``<run-name>-<centre>`` (one per centre); returns their
    report.json paths."""
    method = create_method(config)
    if method.federated:
        raise ValueError(f"method {config.strategy!r} is federated: run it with `flwr run` "
                         "or `cytofed loco`")
    centres = resolve_centres(config)
    held_out_spec = next(c for c in centres if c.name == config.held_out)
    splits = {spec.name: centre_splits(load_centre_data(spec, config), spec.split_seed)
              for spec in training_centres(config, centres)}
    held_out = load_held_out(held_out_spec, training_centres(config, centres), config)
    partitions = method.partitions(list(splits))
    return [train_partition(config, {c: splits[c] for c in partition}, held_out,
                            held_out_spec.taxonomy,
                            config.run_name if len(partitions) == 1
                            else f"{config.run_name}-{'+'.join(partition)}")
            for partition in partitions]


def train_partition(config: RunConfig, sites: dict[str, dict[str, CentreData]],
                    held_out: CentreData, taxonomy: str, run_name: str) -> Path:
    """One model on the pooled training splits of ``sites`` (centre -> its splits), validated
    and tested on their own splits; returns its report.json."""
    train = concatenate([s["train"] for s in sites.values()], "+".join(sites))
    recorder = RunRecorder(config, train.classes, taxonomy, list(sites), run_name,
                           held_out_data=held_out.stats)
    model = new_model(config, len(train.classes))
    if recorder.checkpoint is not None:
        load_state(model, recorder.checkpoint)
        print(f"[cytofed] resuming {recorder.path} after round {recorder.completed}", flush=True)
    images = {"train": place(train, config), "held_out": place(held_out, config),
              **{name: place(s["val"], config) for name, s in sites.items()}}
    clients = [{"centre": name, "class-counts": s["train"].class_counts().tolist()}
               for name, s in sites.items()]
    exported_models = ExportedModels(config.average_last_rounds, recorder.path,
                                     recorder.completed)
    for server_round in range(recorder.completed + 1, config.num_server_rounds + 1):
        started = time.perf_counter()
        metrics = fit(model, train, config, train.class_counts(),
                      progress=server_round / config.num_server_rounds,
                      seed=round_seed(config.seed, server_round, train.name),
                      images=images["train"], centres=len(sites))
        state = model_state(model)
        exported = exported_models.preview(state)
        scored = model if exported is state else with_state(model, exported)
        validation = combine_site_reports([
            site_report("val", score_as_applied(scored, s["val"], config, images[name]),
                        len(train.classes)) for name, s in sites.items()])
        held_out_started = time.perf_counter()
        held_out_scores = {"held_out": None, "held_out_bn_adapted": None}
        if recorder.scores_held_out(server_round, validation):
            held_out_scores = score_held_out(scored, held_out, config, images["held_out"])
        finished = time.perf_counter()
        result = RoundResult(
            round=server_round, train=metrics, validation=validation, **held_out_scores,
            seconds=finished - started, sampled=len(sites), replied=len(sites),
            clients=clients,
            held_out_seconds=finished - held_out_started)
        exported_models.commit(server_round, state)
        recorder.complete_round(result.to_dict(), state, dict(exported))
    final = exported_models.current(model_state(model))
    load_state(model, recorder.best_state())
    return recorder.finish(final, at_temperature(model, sites, held_out, config, images))


def at_temperature(model: nn.Module, sites: dict[str, dict[str, CentreData]],
                   held_out: CentreData, config: RunConfig,
                   images: dict[str, torch.Tensor]) -> EndOfRun:
    """The selected ``model`` at the temperature its centres' validation NLL curves pick, on
    their validation and test splits and the held-out centre (``images``: the placed
    validation splits by centre, and ``held_out``), as a federated run's end does."""
    curves = {name: temperature_curve(model, s["val"], config, images[name])
              for name, s in sites.items()}
    curves = {name: curve for name, curve in curves.items() if curve is not None}
    temperature = pick_temperature(list(curves.values())) if curves else 1.0

    def reports(split: str) -> list[dict]:
        return [{"centre": name, **site_report(split, score_as_applied(
            model, s[split], config, images[name] if split == "val" else None, temperature),
            len(held_out.classes))} for name, s in sites.items()]

    return EndOfRun(temperature, curves, reports("val"), reports("test"),
                    score_held_out(model, held_out, config, images["held_out"], temperature))


def with_state(model: nn.Module, state: dict[str, np.ndarray]) -> nn.Module:
    """A copy of ``model`` holding the weights ``state``."""
    copied = copy.deepcopy(model)
    load_state(copied, state)
    return copied
