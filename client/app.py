"""cytofed ClientApp: a site trains and validates the global model on its own images.

Only weights and aggregate metrics leave the site. The centre comes from ``node_config``:
``centre-config`` (path to the site's centre TOML, in deployment) or ``partition-id``
(simulation: the n-th training centre of the run's data source).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.errors import site_errors_mod
from client.faults import fault_injection_mod
from client.privacy import dp_clipping_mod
from client.site import Site, open_site
from common.pipeline import fit, score

# Errors leave a site as a fixed code (outermost, so it sees every failure); clipping for
# differential privacy wraps everything else, a test-only injected fault included.
MODS = (site_errors_mod, dp_clipping_mod, fault_injection_mod)
app = ClientApp(mods=list(MODS))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global weights; returns the update and training metrics."""
    site = open_site(context)
    config = site.config
    train_config = msg.content["config"]
    model = site.model
    site.restore_local_state(model, msg.content["arrays"], context)
    counts = _class_counts(train_config, site)
    server_round = int(train_config["server-round"])
    metrics = fit(model, site.train, config, counts,
                  progress=server_round / config.num_server_rounds,
                  seed=config.seed * 1000 + server_round, images=site.device_images["train"])
    site.keep_local_state(model, context)
    arrays = site.outgoing_arrays(model)
    described = ConfigRecord({"centre": site.spec.name})
    if site.spec.share_counts:  # the centre's config decides, as for the class_counts query
        described["class-counts"] = site.train.class_counts().tolist()
    reply = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({**metrics, "num-examples": len(site.train),
                                 "update-bytes": arrays.count_bytes()}),
        "site": described,
    })
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the global model on the site's validation split.

    The confidence histograms are shares of the site's validation images per confidence bin,
    so the server's example-weighted average is the pooled histogram of all sites.
    """
    site = open_site(context)
    site.restore_local_state(site.model, msg.content["arrays"], context)
    started = time.perf_counter()
    metrics = score(site.model, site.val, site.config, images=site.device_images["val"])
    seconds = time.perf_counter() - started
    histogram = metrics["confidence_histogram"]
    reply = MetricRecord({"val_loss": metrics["loss"], "val_macro_f1": metrics["macro_f1"],
                          "val_balanced_accuracy": metrics["balanced_accuracy"],
                          "val_correct_by_confidence": [c / len(site.val)
                                                        for c in histogram["correct"]],
                          "val_wrong_by_confidence": [c / len(site.val)
                                                      for c in histogram["wrong"]],
                          "eval_seconds": seconds, "num-examples": len(site.val)})
    return Message(content=RecordDict({"metrics": reply}), reply_to=msg)


@app.query("class_counts")
def class_counts(msg: Message, context: Context) -> Message:
    """The site's training class counts, only if its centre config allows sharing them."""
    site = open_site(context)
    record = ConfigRecord({"share-counts": site.spec.share_counts, "centre": site.spec.name})
    if site.spec.share_counts:
        record["counts"] = site.train.class_counts().tolist()
    return Message(content=RecordDict({"config": record}), reply_to=msg)


def _class_counts(train_config: ConfigRecord, site: Site) -> np.ndarray:
    """Federated class counts when the server sent them, else the site's own."""
    if site.config.class_prior == "federated" and "federated-counts" in train_config:
        return np.asarray(train_config["federated-counts"], dtype=np.int64)
    return site.train.class_counts()


def build_client_app(overrides: Mapping[str, Any]) -> ClientApp:
    """A ClientApp with the handlers of ``app`` that merges ``overrides`` over the run config
    (``flwr.simulation.run_simulation`` hands the apps an empty one)."""

    def merge_overrides(msg: Message, context: Context,
                        call_next: Callable[[Message, Context], Message]) -> Message:
        # Flower refuses a changed run_config: hand on a copy (sharing the node's state).
        return call_next(msg, replace(context, run_config={**context.run_config, **overrides}))

    client_app = ClientApp(mods=[merge_overrides, *MODS])
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    client_app.query("class_counts")(class_counts)
    return client_app
