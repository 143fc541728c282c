"""Label files as labs write them: CSV tables whose columns are found by name or by position.

A reader says which columns it needs (``Column``: a role and the header names it goes by).
``read_label_table`` finds the delimiter (comma, semicolon or tab, from the first line), reads
the header and picks each role's column by its normalised name (case, accents, spaces and
punctuation ignored; the header's order does not matter). A file with exactly as many columns
as required roles (two: the ID or path, then the label) whose header does not name them all is
read by position, and without a header row when its first row already is data. The result
says which columns were used; a file it cannot read is refused naming the file, the line and
what was expected.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.taxonomy import normalise_class_name

DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}
ENCODINGS = ("utf-8-sig", "cp1252")  # Excel on Windows still writes the latter


@dataclass(frozen=True)
class Column:
    """A column a label file may have: its ``role`` and the header names it goes by
    (normalised, most usual first)."""

    role: str
    names: tuple[str, ...]
    required: bool = True


@dataclass(frozen=True)
class LabelTable:
    """The rows of a label file (line number, role -> stripped value) and how it was read."""

    rows: list[tuple[int, dict[str, str]]]
    note: str


def _text(path: Path) -> str:
    data = path.read_bytes()
    for encoding in ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise ValueError(f"{path}: not a text file; expected a CSV in UTF-8 or Windows-1252")


def _delimiter(first_line: str) -> str:
    """The most frequent of the known delimiters in the header line (comma if none)."""
    return max(DELIMITERS, key=first_line.count)


def _by_name(header: list[str], columns: Sequence[Column]) -> dict[str, int]:
    """Role -> column index for every role whose name (or a variant) heads a column."""
    keys = [normalise_class_name(cell) for cell in header]
    found: dict[str, int] = {}
    for column in columns:
        free = [n for n in column.names if n in keys and keys.index(n) not in found.values()]
        if free:
            found[column.role] = keys.index(free[0])
    return found


def read_label_table(path: Path, columns: Sequence[Column],
                     first_row_is_data: Callable[[list[str]], bool]) -> LabelTable:
    """The rows of the label file at ``path`` with the values of ``columns``.

    ``first_row_is_data(cells)`` tells a file without a header row from one whose header
    names its columns in words no variant knows. Raises ValueError naming the file and line.
    """
    text = _text(path)
    delimiter = _delimiter(text.split("\n", 1)[0])
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = [(reader.line_num, [cell.strip() for cell in row]) for row in reader
                if any(cell.strip() for cell in row)]
    except csv.Error as error:
        raise ValueError(f"{path} line {reader.line_num}: not valid CSV: {error}") from error
    required = [c.role for c in columns if c.required]
    wanted = " and ".join(f"{c.role!r} ({', '.join(c.names[:3])}, ...)" for c in columns
                          if c.required)
    if not rows:
        raise ValueError(f"{path}: empty; expected a header row naming the columns ({wanted}) "
                         "and one row per image")
    (header_line, header), data = rows[0], rows[1:]
    found = _by_name(header, columns)
    missing = [role for role in required if role not in found]
    if missing and (len(header) != len(required) or not set(found) <= set(required)):
        raise ValueError(f"{path} line {header_line}: no column for {missing[0]!r}; expected a "
                         f"header naming {wanted} (any case or order), or exactly "
                         f"{len(required)} columns in that order; found {len(header)}: "
                         f"{', '.join(header)}")
    how = "by position" if missing else "by name"
    free = [i for i in range(len(header)) if i not in found.values()]
    found.update(zip(missing, free, strict=True))
    if len(missing) == len(required) and first_row_is_data(header):
        how, data = "by position, no header row", rows
        header = [f"column {i + 1}" for i in range(len(header))]
    width = max(found.values()) + 1
    values = []
    for line, cells in data:
        if len(cells) < width:
            raise ValueError(f"{path} line {line}: expected at least {width} "
                             f"{DELIMITERS[delimiter]}-separated columns "
                             f"({', '.join(found)}), got {len(cells)}: {delimiter.join(cells)}")
        values.append((line, {role: cells[i] for role, i in found.items()}))
    used = ", ".join(f"{role} = {header[i]!r}" for role, i in found.items())
    return LabelTable(values, f"{path.name}: {used} ({how}, {DELIMITERS[delimiter]}-separated)")
