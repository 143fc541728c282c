"""``cytofed data inspect``: what a data folder holds, before anything is trained on it.

The report stays on the machine that runs it: it lists file names (unreadable files,
duplicates), which never leave a site. Files are read, hashed and checked to decode (JPEGs
at 1/8 scale), not fully decoded, so a large folder is inspected in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from common.imagecache import DECODE_ERRORS, file_digest, map_with_progress, probe_image
from common.sources import SOURCE_FORMATS, SourceRecord, read_records
from common.taxonomy import TAXONOMIES, map_label


def _probe(record: SourceRecord) -> tuple[str, tuple[int, int]] | None:
    """(sha256, (width, height)) of a readable image file, None otherwise."""
    try:
        data = record.path.read_bytes()
        return file_digest(data), probe_image(data)
    except DECODE_ERRORS:
        return None


def _summary(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": float(np.median(values)), "max": max(values)}


def inspect_source(path: Path, fmt: str = "auto", taxonomy: str = "wbc5") -> dict[str, Any]:
    """Counts per source and target class, image sizes, unreadable files and duplicates.

    Class counts are of readable image files, duplicates included. Source classes are
    written ``"<format>:<source class>"``; file names are relative to the source folder.
    """
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"unknown taxonomy {taxonomy!r}; known: {', '.join(TAXONOMIES)}")
    path = Path(path)
    fmt, records = read_records(path, fmt)
    base = path if path.is_dir() else path.parent
    probes = list(map_with_progress(_probe, records, f"inspecting {path.name}"))

    def relative(record: SourceRecord) -> str:
        return os.path.relpath(record.path, base)

    source_counts: Counter[str] = Counter()
    dropped_counts: Counter[str] = Counter()
    target_counts = dict.fromkeys(TAXONOMIES[taxonomy], 0)
    files_by_digest: defaultdict[str, list[str]] = defaultdict(list)
    widths, heights, unreadable = [], [], []
    for record, probe in zip(records, probes, strict=True):
        if probe is None:
            unreadable.append(relative(record))
            continue
        digest, (width, height) = probe
        files_by_digest[digest].append(relative(record))
        widths.append(width)
        heights.append(height)
        source_class = f"{fmt}:{record.source_class}"
        source_counts[source_class] += 1
        target = map_label(fmt, record.source_class, taxonomy)
        if target is None:
            dropped_counts[source_class] += 1
        else:
            target_counts[target] += 1
    duplicate_files = [files for files in files_by_digest.values() if len(files) > 1]
    report: dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "taxonomy": taxonomy,
        "files": len(records),
        "readable": len(widths),
        "source_counts": dict(sorted(source_counts.items())),
        "target_counts": target_counts,
        "dropped_counts": dict(sorted(dropped_counts.items())),
        "image_size": {"width": _summary(widths), "height": _summary(heights)},
        "unreadable": unreadable,
        "duplicates": {"groups": len(duplicate_files),
                       "extra_copies": sum(len(files) - 1 for files in duplicate_files),
                       "files": duplicate_files},
    }
    centres = Counter(r.centre for r in records if r.centre is not None)
    if centres:
        report["centre_files"] = dict(sorted(centres.items()))
    return report


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as aligned columns: numbers right-aligned, text left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if cell.isdigit() else cell.ljust(w)
                      for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _size_text(summary: dict[str, float] | None) -> str:
    if summary is None:
        return "-"
    return f"{summary['min']}..{summary['max']} (median {summary['median']:g})"


def format_inspection(report: dict[str, Any]) -> str:
    """The report of ``inspect_source`` as a human-readable, aligned table."""
    fmt, taxonomy = report["format"], report["taxonomy"]
    duplicates = report["duplicates"]
    lines = [
        f"{report['path']}  (format {fmt}, taxonomy {taxonomy})",
        f"files {report['files']}, readable {report['readable']}, "
        f"unreadable {len(report['unreadable'])}, duplicate groups {duplicates['groups']} "
        f"({duplicates['extra_copies']} extra copies)",
        f"image width {_size_text(report['image_size']['width'])}, "
        f"height {_size_text(report['image_size']['height'])}",
        "",
    ]
    source_rows = [("source class", "images", taxonomy)] + [
        (name, str(count), map_label(fmt, name.split(":", 1)[1], taxonomy) or "(dropped)")
        for name, count in report["source_counts"].items()]
    lines += [*_table(source_rows), ""]
    target_rows = [(f"{taxonomy} class", "images")] + [
        (name, str(count)) for name, count in report["target_counts"].items()]
    lines += [*_table(target_rows), f"dropped: {sum(report['dropped_counts'].values())}"]
    if "centre_files" in report:
        centres = ", ".join(f"{name} {count}" for name, count in report["centre_files"].items())
        lines.append(f"files per centre: {centres}")
    if report["unreadable"]:
        lines += ["", "unreadable files:", *(f"  {name}" for name in report["unreadable"])]
    if duplicates["files"]:
        lines += ["", "byte-identical duplicates:",
                  *(f"  {' = '.join(files)}" for files in duplicates["files"])]
    return "\n".join(lines)


def _run_inspect(args: argparse.Namespace) -> int:
    report = inspect_source(args.path, args.format, args.taxonomy)
    print(json.dumps(report, indent=2) if args.json else format_inspection(report))
    return 0


def register_data_command(parser: argparse.ArgumentParser) -> None:
    """Add ``inspect PATH [--format F] [--taxonomy T] [--json]`` under ``cytofed data``."""
    commands = parser.add_subparsers(dest="data_command", required=True)
    inspect = commands.add_parser(
        "inspect", help="count classes, image sizes, unreadable files and duplicates",
        description="What a data folder (or CSV manifest) holds, mapped to a taxonomy.")
    inspect.add_argument("path", type=Path, help="data folder, or CSV manifest")
    inspect.add_argument("--format", default="auto", choices=("auto", *SOURCE_FORMATS),
                         help="source layout (default: detected)")
    inspect.add_argument("--taxonomy", default="wbc5", choices=tuple(TAXONOMIES),
                         help="target vocabulary (default: wbc5)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=_run_inspect)
