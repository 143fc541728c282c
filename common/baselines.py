"""Centralised baselines through the federated runs' data and model code: ``pooled`` and ``local``.

``pooled`` trains one model on the concatenated training splits of every training centre (what
privacy forbids); ``local`` trains one model per training centre on its own split. Like a
federated run they train ``num-server-rounds`` x ``local-epochs`` epochs, in one
:func:`common.pipeline.fit` call per round, and keep the round with the best validation
macro-F1 of the training centres (their pooled validation splits; a local model its own
centre's), never chosen on the held-out centre's labels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.config import RunConfig, resolve_centres, training_centres
from common.data import CentreData, CentreSpec
from common.duplicates import load_held_out
from common.pipeline import centre_splits, fit, load_centre_data, new_model, score, score_held_out
from common.weights import load_state, model_state

SELECTED_BY = "training centres' validation macro-F1"


def concatenate(parts: list[CentreData], name: str) -> CentreData:
    """Several centres' images as one (groups renumbered so they stay apart)."""
    offsets = np.cumsum([0] + [int(p.groups.max(initial=-1)) + 1 for p in parts[:-1]])
    return CentreData(name, parts[0].classes, np.concatenate([p.images for p in parts]),
                      np.concatenate([p.labels for p in parts]),
                      np.concatenate([p.groups + o for p, o in zip(parts, offsets, strict=True)]))


def train_and_select(config: RunConfig, train: CentreData, val: CentreData,
                     held_out: CentreData, trained_on: list[str]) -> dict:
    """Train on ``train``, select the round by ``val`` macro-F1 (ties: the later round), and
    report that model on ``held_out`` in the shape of a federated ``report.json``."""
    model = new_model(config, len(train.classes))
    rounds, best_f1, best_state, best_round = [], -1.0, model_state(model), 0
    for server_round in range(1, config.num_server_rounds + 1):
        metrics = fit(model, train, config, train.class_counts(),
                      progress=server_round / config.num_server_rounds,
                      seed=config.seed * 1000 + server_round)
        val_f1 = score(model, val, config)["macro_f1"]
        rounds.append({"round": server_round, "train_loss": metrics["train_loss"],
                       "val_macro_f1": val_f1})
        if val_f1 >= best_f1:
            best_f1, best_state, best_round = val_f1, model_state(model), server_round
    load_state(model, best_state)
    return {"config": config.to_dict(), "classes": list(train.classes),
            "held_out_centre": config.held_out, "training_centres": trained_on,
            "held_out_data": dict(held_out.stats),
            "rounds": rounds, "best": {"round": best_round, "selected_by": SELECTED_BY,
                                       **score_held_out(model, held_out, config)}}


def _splits(config: RunConfig) -> tuple[list[tuple[CentreSpec, dict[str, CentreData]]],
                                        CentreData]:
    """Each training centre's splits (as its site would see them) and the whole held-out centre
    but for the images a training centre also has."""
    centres = resolve_centres(config)
    held_out = next(c for c in centres if c.name == config.held_out)
    sites = [(spec, centre_splits(load_centre_data(spec, config), spec.split_seed))
             for spec in training_centres(config, centres)]
    return sites, load_held_out(held_out, training_centres(config, centres), config)


def pooled(config: RunConfig) -> list[dict]:
    """One model on all training centres' training splits together."""
    sites, held_out = _splits(config)
    names = [spec.name for spec, _ in sites]
    train, val = (concatenate([splits[part] for _, splits in sites], "pooled")
                  for part in ("train", "val"))
    return [train_and_select(config, train, val, held_out, names)]


def local(config: RunConfig) -> list[dict]:
    """One model per training centre, each on its own splits only."""
    sites, held_out = _splits(config)
    return [train_and_select(config, splits["train"], splits["val"], held_out, [spec.name])
            for spec, splits in sites]


# Baseline name -> runner: its reports, one per trained model, held-out metrics under "best".
BASELINES: dict[str, Callable[[RunConfig], list[dict]]] = {"pooled": pooled, "local": local}
