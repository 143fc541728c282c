"""One live progress bar for long loops (tqdm): redrawn in place on a terminal, and on
``LOG_LINES`` or so separate lines in a log, where a carriage return does not rewind."""

from __future__ import annotations

import math
import sys
from typing import TextIO

from tqdm import tqdm

LOG_LINES = 10  # redraws of a bar written to a log (plus the first and the last)
LOG_FORMAT = "{desc} [{n_fmt}/{total_fmt}, {percentage:.0f}%, {elapsed} elapsed, {remaining} left]"


class LineStream:
    """Text stream that writes each redraw of a bar as its own line (repeats dropped)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, label: str, unit: str = "file", disable: bool = False,
                 stream: TextIO | None = None) -> tqdm:
    """A tqdm bar over ``total`` items on ``stream`` (stderr by default); call ``update(n)``
    and close it (or use it as a context manager)."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return tqdm(total=total, desc=label, unit=unit, file=stream, disable=disable,
                    dynamic_ncols=True)
    return tqdm(total=total, desc=label, unit=unit, file=LineStream(stream), disable=disable,
                bar_format=LOG_FORMAT, mininterval=0, maxinterval=math.inf,
                miniters=max(1, math.ceil(total / LOG_LINES)))
