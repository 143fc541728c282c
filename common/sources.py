"""Readers for the public white-cell dataset layouts: a folder in, labelled file records out.

A reader lists every file that stands for a cell image, readable or not (decoding, and so
finding corrupt files, is the image cache's job), with the class name the source gives it.
``detect_format`` recognises a layout from its folder structure, most specific first.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from common.taxonomy import MATEK, PBC

SYNTHETIC = "synthetic"  # generated clinics: no files, built by ``common.synthetic``


@dataclass(frozen=True)
class SourceRecord:
    """One image file and its source class; ``patient``/``centre`` come from a manifest."""

    path: Path
    source_class: str
    patient: str | None = None
    centre: str | None = None


@dataclass(frozen=True)
class SourceFormat:
    """A layout: how to recognise a folder in it and how to list its records."""

    description: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], list[SourceRecord]]


def _subfolders(path: Path) -> list[Path]:
    """Visible subfolders of ``path``, sorted by name."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    """Every regular file directly in ``folder`` (hidden ones too: they may be mislabelled)."""
    return sorted(p for p in folder.iterdir() if p.is_file())


def _child(path: Path, name: str) -> Path | None:
    """The subfolder of ``path`` called ``name``, ignoring case, if there is one."""
    return next((p for p in _subfolders(path) if p.name.casefold() == name.casefold()), None)


def _descend(path: Path, wrapper: str) -> Path:
    """``path/wrapper`` when that is the only folder in ``path`` (the dataset's usual top
    folder, as unpacked), else ``path``."""
    folders = _subfolders(path)
    only_wrapper = len(folders) == 1 and folders[0].name.casefold() == wrapper.casefold()
    return folders[0] if only_wrapper else path


def _class_folder_records(root: Path, class_of: Callable[[Path, Path], str] | None = None,
                          ) -> list[SourceRecord]:
    """Records of a class-per-folder layout; ``class_of(folder, file)`` defaults to the folder."""
    return [SourceRecord(file, class_of(folder, file) if class_of else folder.name)
            for folder in _subfolders(root) for file in _files(folder)]


def _class_folders_match(path: Path, names: Iterable[str], file_name: re.Pattern[str]) -> bool:
    """Whether ``path`` has subfolders, all named among ``names``, and a file in them whose
    name matches ``file_name``."""
    folders = _subfolders(path)
    return (bool(folders) and {f.name for f in folders} <= set(names)
            and any(file_name.search(file.name) for f in folders for file in _files(f)))


# --- PBC / Acevedo-20 -------------------------------------------------------------------------

PBC_TOP = "PBC_dataset_normal_DIB"
PBC_FOLDERS = {key.split("/")[0] for key in PBC}
PBC_PREFIXES = {folder: {key.split("/")[1] for key in PBC if key.startswith(f"{folder}/")}
                for folder in PBC_FOLDERS}
_PBC_FILE = re.compile(r"^[A-Z]+_\d+\.\w+$")  # BA_101381.jpg


def _pbc_class(folder: Path, file: Path) -> str:
    prefix = file.name.split("_", 1)[0].upper()
    split = prefix in PBC_PREFIXES.get(folder.name, ())
    return f"{folder.name}/{prefix}" if split else folder.name


def _detect_pbc(path: Path) -> bool:
    return _class_folders_match(_descend(path, PBC_TOP), PBC_FOLDERS, _PBC_FILE)


def _read_pbc(path: Path) -> list[SourceRecord]:
    """Class folders; ``ig`` and ``neutrophil`` are split by the file-name prefix."""
    return _class_folder_records(_descend(path, PBC_TOP), _pbc_class)


# --- Matek-19 / AML-Cytomorphology_LMU ----------------------------------------------------------

MATEK_TOP = "AML-Cytomorphology_LMU"
_MATEK_FILE = re.compile(r"\.tiff?$", re.IGNORECASE)


def _detect_matek(path: Path) -> bool:
    return _class_folders_match(_descend(path, MATEK_TOP), MATEK, _MATEK_FILE)


def _read_matek(path: Path) -> list[SourceRecord]:
    """Folders named by class code (``BAS``, ``NGS``...) holding ``.tiff`` images."""
    return _class_folder_records(_descend(path, MATEK_TOP))


# --- Zheng-18 (segmentation_WBC) ----------------------------------------------------------------

_ZHENG_LABELS = re.compile(r"^Class Labels of (Dataset \w+)\.csv$", re.IGNORECASE)


def _zheng_label_files(path: Path) -> list[tuple[Path, Path]]:
    """(labels CSV, image folder) pairs: ``Class Labels of Dataset N.csv`` and ``Dataset N/``."""
    pairs = []
    for csv_file in sorted(path.glob("*.csv")):
        match = _ZHENG_LABELS.match(csv_file.name)
        folder = _child(path, match.group(1)) if match else None
        if folder is not None:
            pairs.append((csv_file, folder))
    return pairs


def _read_csv_rows(csv_file: Path) -> list[dict[str, str]]:
    """Rows of a headed CSV (any line ends, optional BOM), keys and values stripped."""
    with csv_file.open(newline="", encoding="utf-8-sig") as handle:
        return [{key.strip(): (value or "").strip() for key, value in row.items()
                 if key is not None} for row in csv.DictReader(handle)]


def _zheng_records(csv_file: Path, folder: Path) -> list[SourceRecord]:
    # The PNGs beside the images are segmentation masks; images are matched by number.
    images = {int(p.stem): p for p in _files(folder)
              if p.suffix.lower() != ".png" and p.stem.isdigit()}
    records = []
    for line, row in enumerate(_read_csv_rows(csv_file), start=2):
        image_id, code = row.get("image ID", ""), row.get("class label", "")
        if not image_id.isdigit() or not code:
            raise ValueError(f"{csv_file} line {line}: expected 'image ID,class label' with a "
                             f"numeric ID and a code, got {row}")
        path = images.get(int(image_id), folder / f"{int(image_id):03d}.bmp")
        records.append(SourceRecord(path, code))
    return records


def _detect_zheng(path: Path) -> bool:
    return bool(_zheng_label_files(path))


def _read_zheng(path: Path) -> list[SourceRecord]:
    """Numbered BMPs in ``Dataset N/`` labelled by codes 1-5 in ``Class Labels of Dataset N.csv``.

    An ID without an image file yields a record of the missing path (reported unreadable).
    """
    return [record for csv_file, folder in _zheng_label_files(path)
            for record in _zheng_records(csv_file, folder)]


# --- BCCD crops ----------------------------------------------------------------------------------

BCCD_TOP = "BCCD_cropped"
BCCD_FOLDERS = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
_BCCD_FILE = re.compile(r"^BloodImage_")


def _detect_bccd(path: Path) -> bool:
    return _class_folders_match(_descend(path, BCCD_TOP), BCCD_FOLDERS, _BCCD_FILE)


def _read_bccd(path: Path) -> list[SourceRecord]:
    """Capitalised class folders of crops; a ``labels.csv`` beside them labels the whole smear
    photos (not present), not the crops, and is ignored."""
    return _class_folder_records(_descend(path, BCCD_TOP))


# --- Raabin-WBC ----------------------------------------------------------------------------------

RAABIN_SPLITS = ("Train", "TestA", "TestB")


def _raabin_split_folders(path: Path) -> list[Path]:
    return [folder for name in RAABIN_SPLITS if (folder := _child(path, name)) is not None]


def _detect_raabin(path: Path) -> bool:
    return bool(_raabin_split_folders(path))


def _read_raabin(path: Path) -> list[SourceRecord]:
    """Class folders inside ``Train/``, ``TestA/`` and ``TestB/``, all pooled (we split anew)."""
    return [record for split in _raabin_split_folders(path)
            for record in _class_folder_records(split)]


# --- Generic class-per-folder ---------------------------------------------------------------------


def _detect_folder(path: Path) -> bool:
    folders = _subfolders(path)
    return bool(folders) and all(_files(f) and not _subfolders(f) for f in folders)


def _read_folder(path: Path) -> list[SourceRecord]:
    """One folder of files per class, named in words (``neutrophil``, ``band neutrophils``...);
    detected when every subfolder holds files and no further folders."""
    return _class_folder_records(path)


# --- CSV manifest --------------------------------------------------------------------------------

MANIFEST_COLUMNS = ("path", "label", "patient", "centre")


def _detect_manifest(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".csv"


def _read_manifest(path: Path) -> list[SourceRecord]:
    """A CSV with header ``path,label[,patient][,centre]``; relative paths are relative to it."""
    rows = _read_csv_rows(path)
    if not rows or not {"path", "label"} <= rows[0].keys():
        raise ValueError(f"manifest {path}: expected a header row with columns "
                         f"{', '.join(MANIFEST_COLUMNS)} (path and label required) and rows")
    records = []
    for line, row in enumerate(rows, start=2):
        if not row["path"] or not row["label"]:
            raise ValueError(f"manifest {path} line {line}: empty path or label")
        records.append(SourceRecord(path.parent / row["path"], row["label"],
                                    row.get("patient") or None, row.get("centre") or None))
    return records


SOURCE_FORMATS: dict[str, SourceFormat] = {
    "manifest": SourceFormat("CSV file with columns path,label[,patient][,centre]",
                             _detect_manifest, _read_manifest),
    "zheng": SourceFormat("Zheng-18 segmentation_WBC: 'Dataset N/' + 'Class Labels of Dataset "
                          "N.csv'", _detect_zheng, _read_zheng),
    "raabin": SourceFormat("Raabin-WBC: Train/, TestA/, TestB/ with class folders",
                           _detect_raabin, _read_raabin),
    "matek": SourceFormat("Matek-19 AML-Cytomorphology_LMU: class-code folders (BAS, NGS...)",
                          _detect_matek, _read_matek),
    "pbc": SourceFormat("PBC / Acevedo-20: lower-case class folders, PREFIX_123.jpg files",
                        _detect_pbc, _read_pbc),
    "bccd": SourceFormat("BCCD crops: BCCD_cropped/ or capitalised class folders of "
                         "BloodImage_*.jpg", _detect_bccd, _read_bccd),
    "folder": SourceFormat("generic: one folder per class", _detect_folder, _read_folder),
}

LOADABLE_FORMATS = (*SOURCE_FORMATS, SYNTHETIC)


def _known_formats() -> str:
    return "; ".join(f"{name} ({fmt.description})" for name, fmt in SOURCE_FORMATS.items())


def detect_format(path: Path) -> str:
    """The first format (most specific first) whose layout ``path`` matches."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not (path.is_dir() or _detect_manifest(path)):
        raise ValueError(f"{path} is neither a folder nor a CSV manifest; expected one of: "
                         f"{_known_formats()}")
    for name, fmt in SOURCE_FORMATS.items():
        if fmt.detect(path):
            return name
    raise ValueError(f"{path} is in no known layout; expected one of: {_known_formats()}")


def read_records(path: Path, fmt: str = "auto") -> tuple[str, list[SourceRecord]]:
    """The format (detected when ``auto``) and the records of the source at ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"unknown format {fmt!r} for {path}; known: {_known_formats()}")
    if (fmt == "manifest") != path.is_file():
        expected = "a CSV file" if fmt == "manifest" else "a folder"
        raise ValueError(f"format {fmt!r} expects {expected}, but {path} is not one")
    try:
        return fmt, SOURCE_FORMATS[fmt].read(path)
    except PermissionError as error:
        raise ValueError(f"cannot read {path}: {error}") from error
