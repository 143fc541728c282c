"""Client side of central differential privacy: clip the update before it leaves the site."""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` on training messages that carry a clipping norm.

    The server (``server.privacy``) puts the norm into the training config only when
    ``dp-noise-multiplier`` > 0; every other message passes through unchanged.
    """
    is_train = msg.metadata.message_type.split(".")[0] == MessageType.TRAIN
    if is_train and any(KEY_CLIPPING_NORM in r for r in msg.content.config_records.values()):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
