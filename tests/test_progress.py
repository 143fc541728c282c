"""One progress bar: redrawn in place on a terminal, a few lines in a log."""

from __future__ import annotations

import io

from common.progress import LOG_LINES, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_handful_of_lines_however_long_the_run():
    log = io.StringIO()
    with progress_bar(10_000, "loading barcelona", stream=log) as bar:
        for _ in range(10_000):
            bar.update()
    lines = log.getvalue().splitlines()
    assert len(lines) <= LOG_LINES + 2
    assert lines[0].startswith("loading barcelona [0/10000, 0%")
    assert lines[-1].startswith("loading barcelona [10000/10000, 100%")
    assert "\r" not in log.getvalue()


def test_a_terminal_gets_one_line_redrawn_in_place():
    terminal = Terminal()
    with progress_bar(500, "decoding", stream=terminal) as bar:
        for _ in range(500):
            bar.update()
    output = terminal.getvalue()
    assert "\r" in output and output.count("\n") <= 1
    assert "decoding" in output and "500/500" in output


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    with progress_bar(10, "decoding", disable=True, stream=log) as bar:
        bar.update(10)
    assert log.getvalue() == ""
