"""cytofed ClientApp: a site trains the global model on its own images and scores it on its
validation split every round; at the end it sends its validation NLL curve of the selected
model (federated temperature scaling) and scores that model at the chosen temperature on its
validation and test splits.

Only weights and aggregate metrics (confusion counts, confidence shares, losses) leave the
site. The centre comes from ``node_config``:
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
from client.evaluator import register_role_handlers, site_role_mod
from client.faults import fault_injection_mod
from client.privacy import dp_clipping_mod
from client.site import Site, open_site
from common.calibration import CURVE_MESSAGE, CURVE_RECORD, checked_temperature
from common.pipeline import fit, round_seed, score_as_applied, temperature_curve
from common.selection import site_report
from common.stain_sharing import site_restainer

# Errors leave a site as a fixed code (outermost, so it sees every failure); the node's role
# decides which messages reach the app at all (an evaluator site never trains); clipping for
# differential privacy wraps the rest, a test-only injected fault included.
MODS = (site_errors_mod, site_role_mod, dp_clipping_mod, fault_injection_mod)
app = ClientApp(mods=list(MODS))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs (or steps) from the global weights, re-staining batches towards the other
    sites' styles when the server sent a pool; returns the update and training metrics."""
    site = open_site(context)
    config = site.config
    train_config = msg.content["config"]
    model = site.model
    site.load_for_training(model, msg.content["arrays"], context)
    counts = _class_counts(train_config, site)
    server_round = int(train_config["server-round"])
    metrics = fit(model, site.train, config, counts,
                  progress=server_round / config.num_server_rounds,
                  seed=round_seed(config.seed, server_round, site.spec.name),
                  images=site.device_images["train"],
                  restainer=site_restainer(train_config, site.spec.name,
                                           lambda: site.stain_style,
                                           config.restain_probability))
    site.keep(model, context)
    arrays = site.update(model)
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
    """Metrics of the global model on the split the server names (``split`` in the config:
    ``val``, the default, or ``test``) at its ``temperature`` (default 1), as the exported
    model is applied.

    Aggregates only (see ``common.selection.site_report``): confusion counts, and confidence
    histograms as shares of the split's images, so the server's example-weighted average is
    the pooled histogram of all sites.
    """
    site = open_site(context)
    config = msg.content["config"]
    split = str(config.get("split", "val"))
    temperature = checked_temperature(config.get("temperature", 1.0), "the server's "
                                      "'temperature'")
    data = site.split(split)
    site.load_global(site.model, msg.content["arrays"])
    started = time.perf_counter()
    metrics = score_as_applied(site.model, data, site.config,
                               images=site.device_images.get(split), temperature=temperature)
    report = {**site_report(split, metrics, len(site.classes)),
              "eval_seconds": time.perf_counter() - started}
    return Message(content=RecordDict({"metrics": MetricRecord(report),
                                       "site": ConfigRecord({"centre": site.spec.name})}),
                   reply_to=msg)


@app.evaluate(CURVE_MESSAGE.split(".")[1])
def validation_curve(msg: Message, context: Context) -> Message:
    """The summed validation NLL of the global model (as applied) at every temperature of
    ``common.calibration.TEMPERATURES`` and the image count: numbers only, no logit or label.
    A site with an empty validation split sends no curve."""
    site = open_site(context)
    site.load_global(site.model, msg.content["arrays"])
    curve = temperature_curve(site.model, site.val, site.config, site.device_images["val"])
    reply = RecordDict({"site": ConfigRecord({"centre": site.spec.name})})
    if curve is not None:
        reply[CURVE_RECORD] = MetricRecord(curve.to_dict())
    return Message(content=reply, reply_to=msg)


@app.query("class_counts")
def class_counts(msg: Message, context: Context) -> Message:
    """The site's training class counts, only if its centre config allows sharing them."""
    site = open_site(context)
    record = ConfigRecord({"share-counts": site.spec.share_counts, "centre": site.spec.name})
    if site.spec.share_counts:
        record["counts"] = site.train.class_counts().tolist()
    return Message(content=RecordDict({"config": record}), reply_to=msg)


@app.query("stain_stats")
def stain_stats(msg: Message, context: Context) -> Message:
    """The stain statistics of the site's training images (numbers only,
    ``common.stain.StainStats``), only if its centre config allows sharing them."""
    site = open_site(context)
    record = ConfigRecord({"share-stain": site.spec.share_stain, "centre": site.spec.name})
    if site.spec.share_stain:
        style = site.stain_style
        record.update(style.to_dict() if style else {"no-style": True})
    return Message(content=RecordDict({"config": record}), reply_to=msg)


register_role_handlers(app)


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
    client_app.evaluate(CURVE_MESSAGE.split(".")[1])(validation_curve)
    client_app.query("class_counts")(class_counts)
    client_app.query("stain_stats")(stain_stats)
    register_role_handlers(client_app)
    return client_app
