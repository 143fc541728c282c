"""What only a site knows: which centre it is, its splits and, under FedBN, its own BatchNorm.

A site process keeps its :class:`Site` between messages (one per run config and node): the
splits, their images on the training device and one model, which every message reloads from
the global weights. Building the model and uploading the images once, not twice per round,
is most of what a round costs a site besides its compute.
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
from common.models import batchnorm_keys
from common.pipeline import centre_splits, load_centre_data, new_model
from common.train import images_on_device, resolve_device
from common.weights import from_wire, load_state, model_state, to_wire

LOCAL_STATE_KEY = "fedbn-local-state"
# Sites one process keeps open: in simulation one worker serves every node in turn.
SITES_PER_PROCESS = 8


@dataclass
class Site:
    """One site's configuration and data splits, kept by its process between messages."""

    config: RunConfig
    spec: CentreSpec
    train: CentreData
    val: CentreData

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @functools.cached_property
    def model(self) -> nn.Module:
        """The site's one model; each message loads the global weights into it first."""
        return new_model(self.config, len(self.classes))

    @functools.cached_property
    def device_images(self) -> dict[str, torch.Tensor]:
        """The train and val images, uploaded once (see ``images_on_device``)."""
        device = resolve_device(self.config.device)
        return {"train": images_on_device(self.train.images, device),
                "val": images_on_device(self.val.images, device)}

    @property
    def keeps_batchnorm_local(self) -> bool:
        return self.config.strategy == "fedbn"

    def restore_local_state(self, model: nn.Module, arrays: ArrayRecord, context: Context) -> None:
        """Load the global weights; under FedBN overlay this site's own BatchNorm tensors."""
        local_keys = batchnorm_keys(model) if self.keeps_batchnorm_local else set()
        state = from_wire({k: v.numpy() for k, v in arrays.items()}, self.config.wire_precision)
        if local_keys and LOCAL_STATE_KEY in context.state:
            state = {**state, **{k: v.numpy() for k, v in context.state[LOCAL_STATE_KEY].items()}}
        load_state(model, state, allow_missing=local_keys)

    def keep_local_state(self, model: nn.Module, context: Context) -> None:
        """Under FedBN, remember this site's BatchNorm tensors for the next round."""
        if self.keeps_batchnorm_local:
            local_keys = batchnorm_keys(model)
            local = {k: v for k, v in model_state(model).items() if k in local_keys}
            context.state[LOCAL_STATE_KEY] = _to_record(local)

    def outgoing_arrays(self, model: nn.Module) -> ArrayRecord:
        """The update that leaves the site: weights only, BatchNorm excluded under FedBN."""
        exclude = batchnorm_keys(model) if self.keeps_batchnorm_local else set()
        return _to_record(to_wire(model_state(model, exclude), self.config.wire_precision))


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
    return Site(config, spec, splits["train"], splits["val"])
