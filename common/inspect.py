"""``cytofed data inspect``: what a data folder or centre file holds, before anything trains.

A folder or CSV manifest is read, hashed and checked to decode (JPEGs at 1/8 scale), not fully
decoded, so a large folder is inspected in seconds. A centre TOML (a site's file, or a
centres file of several) is inspected with its format, taxonomy and class map, and each
centre is also loaded as training would load it (decoded through the image cache) to report
what it would train on and every load count; several centres are checked for images that
two of them hold (``common.duplicates``).

The report stays on the machine that runs it: it lists file names (unreadable files,
duplicates), which never leave a site.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from common.centres import load_centre, read_centres
from common.config import RunConfig
from common.data import CentreSpec
from common.duplicates import NEAR_DUPLICATE_SIMILARITY, cross_centre_duplicates
from common.imagecache import (
    DECODE_ERRORS,
    MODES,
    file_digest,
    map_with_progress,
    probe_image,
)
from common.sources import SOURCE_FORMATS, SYNTHETIC, SourceRecord, read_records
from common.taxonomy import TAXONOMIES, match_label


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


def inspect_source(path: Path, fmt: str = "auto", taxonomy: str = "wbc5",
                   class_map: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Counts per source and target class, image sizes, unreadable files and duplicates.

    Class counts are of readable image files, duplicates included. Source classes are
    written ``"<format>:<source class>"``; ``classes`` says what each becomes and by which
    rule (``class_map`` first, see ``common.taxonomy.match_label``); ``unknown_counts`` are
    classes nothing matched, left out. File names are relative to the source folder.
    """
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"unknown taxonomy {taxonomy!r}; known: {', '.join(TAXONOMIES)}")
    path = Path(path)
    fmt, listing = read_records(path, fmt)
    records = listing.records
    base = path if path.is_dir() else path.parent
    probes = list(map_with_progress(_probe, records, f"inspecting {path.name}"))
    matches = {name: match_label(fmt, name, taxonomy, class_map)
               for name in sorted({r.source_class for r in records})}

    def relative(record: SourceRecord) -> str:
        return os.path.relpath(record.path, base)

    source_counts: Counter[str] = Counter()
    left_out: dict[bool, Counter[str]] = {True: Counter(), False: Counter()}  # known or not
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
        match = matches[record.source_class]
        if match.target is None:
            left_out[match.known][source_class] += 1
        else:
            target_counts[match.target] += 1
    duplicate_files = [files for files in files_by_digest.values() if len(files) > 1]
    unused = [key for key, value in (class_map or {}).items()
              if not any(match_label(fmt, name, taxonomy, {key: value}).rule == "class map"
                         for name in matches)]
    report: dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "taxonomy": taxonomy,
        "label_files": list(listing.notes),
        "files": len(records),
        "readable": len(widths),
        "source_counts": dict(sorted(source_counts.items())),
        "classes": {f"{fmt}:{name}": {"target": m.target, "rule": m.rule}
                    for name, m in matches.items()},
        "target_counts": target_counts,
        "dropped_counts": dict(sorted(left_out[True].items())),
        "unknown_counts": dict(sorted(left_out[False].items())),
        "class_map_unused": unused,
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


def _loaded(spec: CentreSpec, image_size: int, mode: str, cache_dir: Path) -> dict[str, Any]:
    """What training would load of ``spec``: images, class counts and every load count."""
    data = load_centre(spec, image_size, cache_dir, mode)
    return {"images": len(data), "image_size": image_size, "field_of_view": mode,
            "class_counts": dict(zip(data.classes, data.class_counts().tolist(), strict=True)),
            "stats": dict(data.stats)}


def inspect_centres(path: Path, image_size: int, mode: str, cache_dir: Path) -> dict[str, Any]:
    """Per centre of a centre or centres TOML file: its source (:func:`inspect_source`, with
    its format, taxonomy and class map) and what training would load; with several file-based
    centres, the images found in two of them (exact or near duplicates) and, per centre, how
    many of its images would be left out were it held out."""
    specs = read_centres(path)
    centres = []
    for spec in specs:
        source = (None if spec.format == SYNTHETIC else
                  inspect_source(spec.path, spec.format, spec.taxonomy, dict(spec.class_map)))
        centres.append({"name": spec.name, "source": source,
                        "loaded": _loaded(spec, image_size, mode, cache_dir)})
    report: dict[str, Any] = {"path": str(path), "centres": centres}
    if sum(spec.format != SYNTHETIC for spec in specs) > 1:
        pairs = cross_centre_duplicates(specs, cache_dir)
        shared = Counter(centre for centre, _ in {(p.centre, p.file) for p in pairs}
                         | {(p.other_centre, p.other_file) for p in pairs})
        report["cross_centre_duplicates"] = {
            "min_similarity": NEAR_DUPLICATE_SIMILARITY,
            "left_out_if_held_out": {spec.name: shared[spec.name] for spec in specs},
            "pairs": [asdict(p) for p in pairs]}
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
        *(f"label file {note}" for note in report["label_files"]),
        f"files {report['files']}, readable {report['readable']}, "
        f"unreadable {len(report['unreadable'])}, duplicate groups {duplicates['groups']} "
        f"({duplicates['extra_copies']} extra copies)",
        f"image width {_size_text(report['image_size']['width'])}, "
        f"height {_size_text(report['image_size']['height'])}",
        "",
    ]
    source_rows = [("source class", "images", taxonomy, "by")] + [
        (name, str(count), report["classes"][name]["target"] or
         ("(unknown)" if name in report["unknown_counts"] else "(dropped)"),
         report["classes"][name]["rule"])
        for name, count in report["source_counts"].items()]
    lines += [*_table(source_rows), ""]
    target_rows = [(f"{taxonomy} class", "images")] + [
        (name, str(count)) for name, count in report["target_counts"].items()]
    lines += [*_table(target_rows), f"dropped: {sum(report['dropped_counts'].values())}"]
    if report["unknown_counts"]:
        unknown = ", ".join(f"{name.split(':', 1)[1]!r} {count}"
                            for name, count in report["unknown_counts"].items())
        lines.append(f"unknown classes, left out (name them in the centre file's [classes]): "
                     f"{unknown}")
    if report["class_map_unused"]:
        lines.append(f"[classes] keys that match no source class: "
                     f"{', '.join(report['class_map_unused'])}")
    if "centre_files" in report:
        centres = ", ".join(f"{name} {count}" for name, count in report["centre_files"].items())
        lines.append(f"files per centre: {centres}")
    if report["unreadable"]:
        lines += ["", "unreadable files:", *(f"  {name}" for name in report["unreadable"])]
    if duplicates["files"]:
        lines += ["", "byte-identical duplicates:",
                  *(f"  {' = '.join(files)}" for files in duplicates["files"])]
    return "\n".join(lines)


def _likeness(pair: dict[str, Any]) -> str:
    return "exact" if pair["exact"] else f"near, similarity {pair['similarity']:.3f}"


def format_centres(report: dict[str, Any]) -> str:
    """The report of ``inspect_centres`` as text: per centre its source and what it would
    train on, then the images two centres hold."""
    lines = [f"{report['path']}: {len(report['centres'])} centre(s)"]
    for centre in report["centres"]:
        loaded = centre["loaded"]
        lines += ["", f"== centre {centre['name']} =="]
        if centre["source"] is not None:
            lines += [format_inspection(centre["source"]), ""]
        counts = ", ".join(f"{name} {n}" for name, n in loaded["class_counts"].items())
        stats = ", ".join(f"{key} {value}" for key, value in loaded["stats"].items())
        lines += [f"would train on {loaded['images']} images ({loaded['image_size']} px, "
                  f"field of view {loaded['field_of_view']}): {counts}",
                  f"load counts: {stats or 'none'}"]
    shared = report.get("cross_centre_duplicates")
    if shared is not None:
        losses = ", ".join(f"{name} {n}" for name, n in shared["left_out_if_held_out"].items())
        lines += ["", f"images in two centres (byte-identical, or perceptual hashes at least "
                      f"{shared['min_similarity']} alike): {len(shared['pairs'])} pairs",
                  f"left out of a centre when it is held out: {losses}"]
        lines += [f"  {p['centre']}:{p['file']} = {p['other_centre']}:{p['other_file']} "
                  f"({_likeness(p)})" for p in shared["pairs"]]
    return "\n".join(lines)


def _run_inspect(args: argparse.Namespace) -> int:
    if args.path.suffix.lower() == ".toml":
        if args.format or args.taxonomy:
            raise ValueError(f"{args.path}: a centre file sets its own format and taxonomy; "
                             "--format and --taxonomy are for a folder or manifest")
        report = inspect_centres(args.path, args.image_size, args.field_of_view,
                                 args.cache_dir.expanduser())
        text = format_centres
    else:
        report = inspect_source(args.path, args.format or "auto", args.taxonomy or "wbc5")
        text = format_inspection
    print(json.dumps(report, indent=2) if args.json else text(report))
    return 0


def register_data_command(parser: argparse.ArgumentParser) -> None:
    """Add ``inspect PATH [--format F] [--taxonomy T] [--image-size S] [--field-of-view V]
    [--cache-dir D] [--json]`` under ``cytofed data``."""
    commands = parser.add_subparsers(dest="data_command", required=True)
    inspect = commands.add_parser(
        "inspect", help="count classes, image sizes, unreadable files and duplicates",
        description="What a data folder, CSV manifest, centre file or centres file holds, "
                    "mapped to a taxonomy; for a centre file also what training would load, "
                    "and images that two centres hold.")
    inspect.add_argument("path", type=Path,
                         help="data folder, CSV manifest, or centre / centres TOML file")
    inspect.add_argument("--format", choices=("auto", *SOURCE_FORMATS),
                         help="source layout of a folder (default: detected)")
    inspect.add_argument("--taxonomy", choices=tuple(TAXONOMIES),
                         help="target vocabulary of a folder (default: wbc5)")
    inspect.add_argument("--image-size", type=int, default=RunConfig.image_size,
                         help="side a centre file's images are loaded at (default: "
                              "%(default)s, the run config's)")
    inspect.add_argument("--field-of-view", choices=MODES, default=RunConfig.field_of_view,
                         help="view a centre file's images are loaded with (default: "
                              "%(default)s)")
    inspect.add_argument("--cache-dir", type=Path,
                         default=Path(os.environ.get("CYTOFED_CACHE_DIR", RunConfig.cache_dir)),
                         help="decoded-image and hash cache (default: $CYTOFED_CACHE_DIR, else "
                              f"{RunConfig.cache_dir}, as for training)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=_run_inspect)
