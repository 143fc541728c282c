"""Client side of central differential privacy: clip the update before it leaves the site."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.privacy import BUFFERS_KEY, clip_state


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip a training reply's update to the norm the server sent, over the trained tensors.

    The server (``server.privacy``) puts the clipping norm, and the keys of the model's
    buffers (sent unclipped, see ``common.privacy``), into the training config only when
    ``dp-noise-multiplier`` > 0; every other message passes through unchanged.
    """
    is_train = msg.metadata.message_type.split(".")[0] == MessageType.TRAIN
    config = next((r for r in msg.content.config_records.values() if KEY_CLIPPING_NORM in r),
                  None)
    if not is_train or config is None:
        return call_next(msg, context)
    reference = {key: array.numpy() for key, array in msg.content["arrays"].items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    buffers = set(config.get(BUFFERS_KEY, []))
    for name, record in reply.content.array_records.items():
        state = {key: array.numpy() for key, array in record.items()}
        clipped = clip_state(state, reference, float(config[KEY_CLIPPING_NORM]),
                             [key for key in state if key not in buffers])
        reply.content[name] = ArrayRecord({key: Array(value) for key, value in clipped.items()})
    return reply
