"""What a failing site tells the server: a fixed code. The exception stays in the site's log.

Flower would send ``str(exception)`` as the error's reason, and a site's exceptions name its
data paths and CSV rows. :func:`site_errors_mod` wraps every handler: it logs the full
exception and traceback at the site and replies with one of :data:`CODES` instead.
"""

from __future__ import annotations

import logging
import traceback

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from common.config import ConfigError

CONFIG = "site-error:config"  # the run config or the site's node config is not usable
DATA = "site-error:data"  # the site's centre description, files or images
INTERNAL = "site-error:internal"  # anything else: a bug or the machine
CODES = (CONFIG, DATA, INTERNAL)
# Modules whose exceptions are about the site's data and how it is described.
DATA_MODULES = ("common.centres", "common.sources", "common.imagecache", "common.synthetic",
                "common.data", "common.fov", "common.taxonomy", "common.inspect")

logger = logging.getLogger("cytofed.site")


def error_code(error: BaseException) -> str:
    """The code a site sends for ``error``: config, data (file errors, or raised while reading
    the centre) or internal."""
    if isinstance(error, ConfigError):
        return CONFIG
    raised_in = [frame.f_globals.get("__name__", "")
                 for frame, _ in traceback.walk_tb(error.__traceback__)]
    if isinstance(error, OSError) or any(name in DATA_MODULES for name in raised_in):
        return DATA
    return INTERNAL


def site_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Log a handler's exception at the site and reply with its code only."""
    try:
        return call_next(msg, context)
    except Exception as error:  # every failure becomes a code; the details stay here
        code = error_code(error)
        logger.error("%s failed (%s sent to the server)", msg.metadata.message_type, code,
                     exc_info=error)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=code),
                       reply_to=msg)
