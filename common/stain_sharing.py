"""Federated stain-style sharing (CCST-style, Chen et al. 2023): what travels and what a site
does with it.

Before round 1 each site whose centre file sets ``share_stain = true`` sends the
:class:`common.stain.StainStats` of its training images (numbers, never images); the server
checks them and sends the pool of every shared style, by centre, to every site in its training
config (:func:`pack_pool`). A site then re-stains its training batches towards the other
sites' styles on the device (:func:`site_restainer`); its own style, computed at the site, is
the starting point and need not have been shared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from common.stain import Restainer, StainStats, pack_styles, style_pool, unpack_styles

POOL_CENTRES_KEY = "stain-pool-centres"  # the centres of the pooled styles, in pool order
POOL_PREFIX = "stain-pool."  # the pooled styles' fields (``common.stain.pack_styles``)


def pack_pool(shared: Mapping[str, StainStats]) -> dict[str, list]:
    """The pooled styles, by centre, as flat ConfigRecord entries."""
    centres = sorted(shared)
    packed = pack_styles([shared[centre] for centre in centres])
    return {POOL_CENTRES_KEY: centres,
            **{f"{POOL_PREFIX}{name}": values for name, values in packed.items()}}


def unpack_pool(record: Mapping[str, Any]) -> dict[str, StainStats] | None:
    """Checked inverse of :func:`pack_pool` (None when ``record`` holds no pool)."""
    if POOL_CENTRES_KEY not in record:
        return None
    centres = [str(centre) for centre in record[POOL_CENTRES_KEY]]
    styles = unpack_styles({key.removeprefix(POOL_PREFIX): value for key, value in record.items()
                            if key.startswith(POOL_PREFIX)}, "stain style pool")
    if len(styles) != len(centres) or len(set(centres)) != len(centres):
        raise ValueError(f"stain style pool: {len(styles)} styles for centres {centres}")
    return dict(zip(centres, styles, strict=True))


def site_restainer(record: Mapping[str, Any], centre: str,
                   own_style: Callable[[], StainStats | None],
                   probability: float) -> Restainer | None:
    """The re-staining of ``centre``'s training batches towards the other sites' styles of the
    pool in ``record`` (a training config); None without a pool, without another site's style
    in it, or without the site's own style (``own_style()``, asked only when there is a pool;
    None when too few stained pixels give one)."""
    pool = unpack_pool(record)
    others = style_pool(pool, centre) if pool else []
    own = own_style() if others else None
    if own is None:
        return None
    return Restainer(own, others, probability=probability)
