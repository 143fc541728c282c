"""What only a site knows: which centre it is, its splits and the tensors its method keeps.

A site process keeps its :class:`Site` between messages (one per run config and node): the
splits, their images on the training device and one model, which every message reloads from
the global weights. Building the model and uploading the images once, not twice per round,
is most of what a round costs a site besides its compute. The run's method
(``common.methods``) says which tensors a site keeps between rounds (loaded over the global
ones before it trains: FedBN's BatchNorm) and which it sends.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, Context
from torch import nn

from common.config import RunConfig, parse_run_config, resolve_centres, training_centres
from common.data import CentreData, CentreSpec
from common.methods import Method, create_method
from common.pipeline import centre_splits, load_centre_data, new_model, place
from common.selection import SPLITS
from common.stain import StainStats, site_stain_stats
from common.weights import from_wire, load_state, model_state, to_wire

KEPT_STATE_KEY = "site-kept-state"
# Sites one process keeps open: in simulation one worker serves every node in turn.
SITES_PER_PROCESS = 8


@dataclass
class Site:
    """One site's configuration and data splits, kept by its process between messages."""

    config: RunConfig
    spec: CentreSpec
    train: CentreData
    val: CentreData
    test: CentreData

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @functools.cached_property
    def method(self) -> Method:
        return create_method(self.config)

    @functools.cached_property
    def model(self) -> nn.Module:
        """The site's one model; each message loads the global weights into it first."""
        return new_model(self.config, len(self.classes))

    @functools.cached_property
    def device_images(self) -> dict[str, torch.Tensor]:
        """The train and val images, placed once (``common.pipeline.place``: stain-normalised,
        uploaded); the test split is scored once per run and placed then."""
        return {"train": place(self.train, self.config), "val": place(self.val, self.config)}

    @functools.cached_property
    def stain_style(self) -> StainStats | None:
        """The stain statistics of the site's training images as the model sees them (after
        ``stain-normalise``, which re-staining follows); None when too few stained pixels give
        no stain matrix. Computed once; shared only where the centre allows."""
        images = self.device_images["train"].cpu().numpy()
        try:
            return site_stain_stats(images, seed=self.spec.split_seed)
        except ValueError:
            return None

    def split(self, name: str) -> CentreData:
        """The split a server asks the site to score (``val`` or ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; a site scores one of {SPLITS}")
        return getattr(self, name)

    def load_global(self, model: nn.Module, arrays: ArrayRecord) -> None:
        """Load the global weights the server sent (as they are: validation and test score
        the global model)."""
        state = from_wire({k: v.numpy() for k, v in arrays.items()}, self.config.wire_precision)
        load_state(model, state)

    def load_for_training(self, model: nn.Module, arrays: ArrayRecord, context: Context) -> None:
        """The global weights with the tensors this site keeps, from its previous round, over
        them."""
        self.load_global(model, arrays)
        if KEPT_STATE_KEY in context.state:
            kept = {k: v.numpy() for k, v in context.state[KEPT_STATE_KEY].items()}
            load_state(model, kept, allow_missing=set(model_state(model)) - set(kept))

    def keep(self, model: nn.Module, context: Context) -> None:
        """Remember the tensors the method keeps at the site for the next round."""
        keys = self.method.kept_keys(model)
        if keys:
            context.state[KEPT_STATE_KEY] = _to_record(
                {k: v for k, v in model_state(model).items() if k in keys})

    def update(self, model: nn.Module) -> ArrayRecord:
        """The update that leaves the site: the tensors the method sends, in wire precision."""
        sent = self.method.sent_keys(model)
        state = {k: v for k, v in model_state(model).items() if k in sent}
        return _to_record(to_wire(state, self.config.wire_precision))


def _to_record(state: dict) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in state.items()})


def site_centre(config: RunConfig, node_config: dict) -> CentreSpec:
    """The centre this node serves: from its centre TOML or, in simulation, its partition id."""
    if "centre-config" in node_config:
        from common.centres import read_centre

        return read_centre(Path(str(node_config["centre-config"])))
    if "partition-id" not in node_config:
        raise ValueError("node_config needs 'centre-config' (path to the site's centre TOML) "
                         "or, in simulation, 'partition-id'")
    centres = training_centres(config, resolve_centres(config))
    partition = int(node_config["partition-id"])
    if partition >= len(centres):
        raise ValueError(f"partition-id {partition} but the run has {len(centres)} training "
                         f"centres {[c.name for c in centres]}: use num-supernodes={len(centres)}")
    return centres[partition]


def open_site(context: Context) -> Site:
    """The site of this node for the run described by ``context`` (kept by the process)."""
    node_config = tuple(sorted(dict(context.node_config).items()))
    return _open_site(parse_run_config(context.run_config), node_config)


@functools.lru_cache(maxsize=SITES_PER_PROCESS)
def _open_site(config: RunConfig, node_config: tuple) -> Site:
    spec = site_centre(config, dict(node_config))
    splits = centre_splits(load_centre_data(spec, config), spec.split_seed)
    return Site(config, spec, splits["train"], splits["val"], splits["test"])
