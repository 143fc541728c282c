"""Test-only fault injection: a SuperNode told to misbehave, so tests can watch the server cope.

A ClientApp honours a fault only when its SuperNode was started with it in ``node_config``,
for example ``flower-supernode --node-config "centre-config='...' fault='nan-weights'"``.
Production sites never set ``fault``; without it :func:`fault_injection_mod` changes nothing.

``nan-weights``: training runs as usual, then every floating-point weight in the reply is NaN.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

FAULT_KEY = "fault"
NAN_WEIGHTS = "nan-weights"


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the node's configured fault to its training replies."""
    fault = context.node_config.get(FAULT_KEY)
    if fault is None:
        return call_next(msg, context)
    if fault != NAN_WEIGHTS:
        raise ValueError(f"node_config {FAULT_KEY}={fault!r}: the only fault is {NAN_WEIGHTS!r}")
    reply = call_next(msg, context)
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error():
        return reply
    for name, record in reply.content.array_records.items():
        reply.content[name] = ArrayRecord({key: Array(_nan_like(array.numpy()))
                                           for key, array in record.items()})
    return reply


def _nan_like(array: np.ndarray) -> np.ndarray:
    return np.full_like(array, np.nan) if np.issubdtype(array.dtype, np.floating) else array
