"""Centre TOML files and loading one centre's images, labels and groups.

A centre file describes one site (relative paths are relative to the file)::

    name = "barcelona"
    path = "../data/PBC_dataset_normal_DIB"
    format = "pbc"        # optional, default "auto" (detected from the layout)
    taxonomy = "wbc5"     # optional, default "wbc5"
    split_seed = 0        # optional
    share_counts = true   # optional: may the site tell the server its class counts
    share_stain = false   # optional: may it share its stain statistics (run config
                          # stain-sharing: numbers only, see common.stain.StainStats)

    [classes]             # optional, any format: the source's class names -> taxonomy class
    Baso = "basophil"
    "Neutrófilos" = "neutrophil"
    Blasts = "drop"       # left out, counted as dropped

Without ``[classes]`` a source class is mapped by its format's table (``common.taxonomy``:
names in words also by abbreviation, plural, other language or an unambiguous typo); a class
nothing matches is left out and counted as ``unknown:<class>``, never guessed.

A centres file lists several sites as an array of tables, each with the same keys (a class
map as ``[centre.classes]``)::

    [[centre]]
    name = "barcelona"
    path = "..."

    [[centre]]
    name = "jiangxi"
    path = "..."

``format = "synthetic"`` names a generated clinic of ``common.synthetic``; it needs no path.
"""

from __future__ import annotations

import sys
import tomllib
from collections import Counter
from collections.abc import Sequence, Set
from pathlib import Path
from typing import Any

import numpy as np

from common.data import CentreData, CentreSpec
from common.imagecache import MODES, load_images
from common.sources import LOADABLE_FORMATS, SYNTHETIC, SourceRecord, read_records
from common.taxonomy import DROP, TAXONOMIES, check_class_map, match_label

FIELDS: dict[str, type] = {"name": str, "path": str, "format": str, "taxonomy": str,
                           "split_seed": int, "share_counts": bool, "share_stain": bool,
                           "classes": dict}
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false",
              dict: f'a table of source class = taxonomy class or "{DROP}"'}


def _read_toml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"centre file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from error


def _check_types(table: dict[str, Any], where: str) -> None:
    unknown = sorted(table.keys() - FIELDS.keys())
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(FIELDS)}")
    for key, value in table.items():
        expected = FIELDS[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{where}: field {key!r} must be {TYPE_NAMES[expected]}, "
                             f"got {value!r}")


def _parse_centre(table: dict[str, Any], base_dir: Path, where: str) -> CentreSpec:
    """A ``CentreSpec`` from one TOML table; ``where`` names the file (and table) in errors."""
    _check_types(table, where)
    if not table.get("name", "").strip():
        raise ValueError(f"{where}: field 'name' is missing or empty")
    fmt = table.get("format", "auto")
    if fmt not in ("auto", *LOADABLE_FORMATS):
        raise ValueError(f"{where}: field 'format' is {fmt!r}; known: auto, "
                         f"{', '.join(LOADABLE_FORMATS)}")
    taxonomy = table.get("taxonomy", "wbc5")
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"{where}: field 'taxonomy' is {taxonomy!r}; known: "
                         f"{', '.join(TAXONOMIES)}")
    if fmt == SYNTHETIC and taxonomy != "wbc5":
        raise ValueError(f"{where}: synthetic centres use taxonomy 'wbc5', not {taxonomy!r}")
    if "path" not in table and fmt != SYNTHETIC:
        raise ValueError(f"{where}: field 'path' is missing (the centre's data folder or "
                         "manifest, relative to this file)")
    classes = table.get("classes", {})
    if classes and fmt == SYNTHETIC:
        raise ValueError(f"{where}: synthetic centres have no source classes to map; remove "
                         "[classes]")
    try:
        check_class_map(classes, taxonomy)
    except ValueError as error:
        raise ValueError(f"{where}: [classes]: {error}") from error
    path = Path(base_dir) / Path(table["path"]).expanduser() if "path" in table else None
    return CentreSpec(name=table["name"], path=path, format=fmt, taxonomy=taxonomy,
                      split_seed=table.get("split_seed", 0),
                      share_counts=table.get("share_counts", True),
                      share_stain=table.get("share_stain", False),
                      class_map=tuple(classes.items()))


def read_centre(path: Path) -> CentreSpec:
    """The centre described by a one-centre TOML file."""
    document = _read_toml(path)
    if "centre" in document:
        raise ValueError(f"{path}: holds a [[centre]] list; a site's file describes one centre "
                         "with top-level keys (name, path, ...)")
    return _parse_centre(document, Path(path).parent, str(path))


def read_centres(path: Path) -> list[CentreSpec]:
    """The centres of a ``[[centre]]`` file (a one-centre file gives a list of one)."""
    document = _read_toml(path)
    if "centre" not in document:
        return [_parse_centre(document, Path(path).parent, str(path))]
    tables = document["centre"]
    others = sorted(document.keys() - {"centre"})
    if others:
        raise ValueError(f"{path}: unknown top-level key {others[0]!r} beside [[centre]]")
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{path}: 'centre' must be a non-empty array of tables ([[centre]])")
    centres = [_parse_centre(table, Path(path).parent, f"{path}: [[centre]] #{i}")
               for i, table in enumerate(tables, start=1)]
    names = Counter(c.name for c in centres)
    repeated = [name for name, count in names.items() if count > 1]
    if repeated:
        raise ValueError(f"{path}: centre name {repeated[0]!r} is used more than once")
    return centres


def group_ids(digests: Sequence[str], patients: Sequence[str | None]) -> np.ndarray:
    """Int64 group per image: identical content or the same patient join one group.

    Groups are the connected components of both relations, numbered by first appearance.
    """
    parent = list(range(len(digests)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[str, str], int] = {}
    for i, (digest, patient) in enumerate(zip(digests, patients, strict=True)):
        keys = [("content", digest)] + ([("patient", patient)] if patient is not None else [])
        for key in keys:
            parent[root(i)] = root(first_with.setdefault(key, i))
    roots = np.array([root(i) for i in range(len(digests))], dtype=np.int64)
    _, first, ids = np.unique(roots, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[ids].astype(np.int64)


def _records_of_centre(records: list[SourceRecord], name: str, path: Path) -> list[SourceRecord]:
    """A manifest with a centre column keeps the centre's rows only."""
    centres = sorted({r.centre for r in records if r.centre is not None})
    if not centres:
        return records
    if name not in centres:
        raise ValueError(f"centre {name!r}: manifest {path} has a centre column but no rows "
                         f"for this centre; it lists {', '.join(centres)}")
    return [r for r in records if r.centre == name]


def _load_synthetic(spec: CentreSpec, image_size: int, cache_dir: Path, mode: str,
                    n_images: int) -> CentreData:
    from common.synthetic import load_clinic

    if spec.taxonomy != "wbc5":
        raise ValueError(f"centre {spec.name!r}: synthetic centres use taxonomy 'wbc5'")
    images, labels = load_clinic(spec.name, image_size, cache_dir, n_images=n_images)
    if mode == "cell":
        from common.fov import normalise_field_of_view

        images, found = normalise_field_of_view(images, image_size)
    return CentreData(spec.name, TAXONOMIES["wbc5"], images, np.asarray(labels, np.int64),
                      np.arange(len(labels), dtype=np.int64),
                      {"cell_fallback": int((~found).sum())} if mode == "cell" else {})


def _usable(spec: CentreSpec) -> tuple[list[tuple[SourceRecord, int]], Counter[str],
                                        tuple[str, ...]]:
    """:func:`usable_records` and the reader's notes (label-file columns used)."""
    if spec.taxonomy not in TAXONOMIES:
        raise ValueError(f"centre {spec.name!r}: unknown taxonomy {spec.taxonomy!r}; known: "
                         f"{', '.join(TAXONOMIES)}")
    if spec.path is None or not Path(spec.path).exists():
        raise FileNotFoundError(f"centre {spec.name!r}: data path {spec.path} does not exist; "
                                "expected a folder in a known layout or a CSV manifest")
    path = Path(spec.path)
    try:
        fmt, listing = read_records(path, spec.format)
    except PermissionError as error:
        raise ValueError(f"centre {spec.name!r}: cannot read {path}: {error}") from error
    except ValueError as error:
        raise ValueError(f"centre {spec.name!r}: {error}") from error
    records = _records_of_centre(listing.records, spec.name, path)
    classes = TAXONOMIES[spec.taxonomy]
    matches = {name: match_label(fmt, name, spec.taxonomy, dict(spec.class_map))
               for name in sorted({r.source_class for r in records})}
    kept = [(r, classes.index(target)) for r in records
            if (target := matches[r.source_class].target)]
    left_out = Counter(f"{'dropped' if matches[r.source_class].known else 'unknown'}:"
                       f"{r.source_class}" for r in records if not matches[r.source_class].target)
    if not kept:
        found = list(matches) or ["no image files"]
        raise ValueError(f"centre {spec.name!r}: nothing in {path} (format {fmt}) maps to a "
                         f"{spec.taxonomy} class ({', '.join(classes)}); found: "
                         f"{', '.join(found)}; map them in the centre file's [classes]")
    return kept, left_out, listing.notes


def usable_records(spec: CentreSpec) -> tuple[list[tuple[SourceRecord, int]], Counter[str]]:
    """A file-based centre's image files that map to a class of its taxonomy, with the class
    index, and the files left out per source class: ``dropped:<class>`` (no class in the
    taxonomy, or mapped to ``drop``) and ``unknown:<class>`` (a name nothing matched). Files
    are listed, not decoded.

    Raises FileNotFoundError or ValueError, naming the centre and its path, when the data path
    is missing or unreadable, in no known layout, or nothing in it maps to a class.
    """
    kept, left_out, _ = _usable(spec)
    return kept, left_out


def _tell_site(spec: CentreSpec, notes: tuple[str, ...], left_out: Counter[str]) -> None:
    """How the centre's label files were read and which classes nobody knows, on stderr."""
    for note in notes:
        print(f"[cytofed] centre {spec.name!r}: {note}", file=sys.stderr)
    for key, count in sorted(left_out.items()):
        if key.startswith("unknown:"):
            print(f"[cytofed] centre {spec.name!r}: {count} images of class "
                  f"{key.removeprefix('unknown:')!r} left out: no {spec.taxonomy} class goes by "
                  "that name; name one (or 'drop') in the centre file's [classes]",
                  file=sys.stderr)


def load_centre(spec: CentreSpec, image_size: int, cache_dir: Path, mode: str = "full",
                synthetic_images: int = 600,
                shared_with_training: Set[str] | None = None) -> CentreData:
    """Images, taxonomy labels and groups of one centre, decoded through the image cache.

    Classes without a target in the taxonomy are dropped and counted (``dropped:<class>``,
    ``unknown:<class>``); unreadable files are skipped and counted; byte-identical files and,
    with a manifest patient column, one patient's images share a group. A held-out centre
    passes ``shared_with_training``, the sha256 digests of its files that a training centre
    also has: they are left out and counted (``shared_with_training``). Raises
    FileNotFoundError or ValueError, naming the centre and its path, when there is nothing
    usable to load.
    """
    if mode not in MODES:
        raise ValueError(f"centre {spec.name!r}: unknown preprocessing mode {mode!r}; known: "
                         f"{', '.join(MODES)}")
    if spec.format == SYNTHETIC:
        return _load_synthetic(spec, image_size, cache_dir, mode, synthetic_images)
    kept, left_out, notes = _usable(spec)
    _tell_site(spec, notes, left_out)
    loaded = load_images([r.path for r, _ in kept], image_size, cache_dir, mode,
                         label=f"loading {spec.name}")
    if not len(loaded.readable):
        raise ValueError(f"centre {spec.name!r}: none of the {len(kept)} image files in "
                         f"{spec.path} could be read as an image")
    keep = np.array([d not in (shared_with_training or ()) for d in loaded.digests])
    if not keep.any():
        raise ValueError(f"centre {spec.name!r}: every image in {spec.path} is also in a "
                         "training centre; nothing is left to hold out")
    readable = [kept[i] for i in loaded.readable[keep]]
    digests = [d for d, k in zip(loaded.digests, keep, strict=True) if k]
    stats = {"unreadable": len(loaded.unreadable),
             "duplicates": len(digests) - len(set(digests)),
             **({} if shared_with_training is None
                else {"shared_with_training": int((~keep).sum())}),
             **dict(sorted(left_out.items())),
             **({"cell_fallback": int(loaded.cell_fallback[keep].sum())}
                if mode == "cell" and loaded.cell_fallback is not None else {})}
    return CentreData(
        name=spec.name,
        classes=TAXONOMIES[spec.taxonomy],
        images=loaded.images if keep.all() else loaded.images[keep],
        labels=np.array([label for _, label in readable], dtype=np.int64),
        groups=group_ids(digests, [r.patient for r, _ in readable]),
        stats=stats,
    )
