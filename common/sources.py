"""Readers for the public white-cell dataset layouts: a folder in, labelled file records out.

A reader lists every file that stands for a cell image, readable or not (decoding, and so
finding corrupt files, is the image cache's job), with the class name the source gives it.
``detect_format`` recognises a layout from its folder structure, most specific first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from common.labelfiles import Column, read_label_table
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
class Listing:
    """What a reader found: its records and how it read them (label-file columns used)."""

    records: list[SourceRecord]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceFormat:
    """A layout: how to recognise a folder in it and how to list its records."""

    description: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], Listing]


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


def _read_pbc(path: Path) -> Listing:
    """Class folders; ``ig`` and ``neutrophil`` are split by the file-name prefix."""
    return Listing(_class_folder_records(_descend(path, PBC_TOP), _pbc_class))


# --- Matek-19 / AML-Cytomorphology_LMU ----------------------------------------------------------

MATEK_TOP = "AML-Cytomorphology_LMU"
_MATEK_FILE = re.compile(r"\.tiff?$", re.IGNORECASE)


def _detect_matek(path: Path) -> bool:
    return _class_folders_match(_descend(path, MATEK_TOP), MATEK, _MATEK_FILE)


def _read_matek(path: Path) -> Listing:
    """Folders named by class code (``BAS``, ``NGS``...) holding ``.tiff`` images."""
    return Listing(_class_folder_records(_descend(path, MATEK_TOP)))


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


ZHENG_COLUMNS = (
    Column("image ID", ("image_id", "id", "image", "image_no", "image_number", "image_name",
                        "img_id", "file", "filename", "file_name", "name")),
    Column("class label", ("class_label", "class", "label", "class_id", "class_code",
                           "category", "cell_type", "type")),
)
_ZHENG_ID = re.compile(r"0*(\d+)(\.\w+)?")  # 7, 007 or 007.bmp


def _zheng_id(value: str) -> int | None:
    match = _ZHENG_ID.fullmatch(value)
    return int(match.group(1)) if match else None


def _zheng_records(csv_file: Path, folder: Path) -> Listing:
    # The PNGs beside the images are segmentation masks; images are matched by number.
    images = {int(p.stem): p for p in _files(folder)
              if p.suffix.lower() != ".png" and p.stem.isdigit()}
    table = read_label_table(csv_file, ZHENG_COLUMNS,
                             lambda cells: _zheng_id(cells[0]) is not None)
    records = []
    for line, row in table.rows:
        image_id, code = _zheng_id(row["image ID"]), row["class label"]
        if image_id is None or not code:
            raise ValueError(f"{csv_file} line {line}: expected a numeric image ID and a class "
                             f"code, got {row['image ID']!r} and {code!r}")
        records.append(SourceRecord(images.get(image_id, folder / f"{image_id:03d}.bmp"), code))
    return Listing(records, (table.note,))


def _detect_zheng(path: Path) -> bool:
    return bool(_zheng_label_files(path))


def _read_zheng(path: Path) -> Listing:
    """Numbered BMPs in ``Dataset N/`` labelled by codes 1-5 in ``Class Labels of Dataset N.csv``
    (``image ID,class label`` in Dataset 1, ``image ID,class`` in Dataset 2; any header variant,
    order or delimiter).

    An ID without an image file yields a record of the missing path (reported unreadable).
    """
    listings = [_zheng_records(csv_file, folder) for csv_file, folder in _zheng_label_files(path)]
    return Listing([r for listing in listings for r in listing.records],
                   tuple(note for listing in listings for note in listing.notes))


# --- BCCD crops ----------------------------------------------------------------------------------

BCCD_TOP = "BCCD_cropped"
BCCD_FOLDERS = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
_BCCD_FILE = re.compile(r"^BloodImage_")


def _detect_bccd(path: Path) -> bool:
    return _class_folders_match(_descend(path, BCCD_TOP), BCCD_FOLDERS, _BCCD_FILE)


def _read_bccd(path: Path) -> Listing:
    """Capitalised class folders of crops; a ``labels.csv`` beside them labels the whole smear
    photos (not present), not the crops, and is ignored."""
    return Listing(_class_folder_records(_descend(path, BCCD_TOP)))


# --- Raabin-WBC ----------------------------------------------------------------------------------

RAABIN_SPLITS = ("Train", "TestA", "TestB")


def _raabin_split_folders(path: Path) -> list[Path]:
    return [folder for name in RAABIN_SPLITS if (folder := _child(path, name)) is not None]


def _detect_raabin(path: Path) -> bool:
    return bool(_raabin_split_folders(path))


def _read_raabin(path: Path) -> Listing:
    """Class folders inside ``Train/``, ``TestA/`` and ``TestB/``, all pooled (we split anew)."""
    return Listing([record for split in _raabin_split_folders(path)
                    for record in _class_folder_records(split)])


# --- Generic class-per-folder ---------------------------------------------------------------------


def _detect_folder(path: Path) -> bool:
    folders = _subfolders(path)
    return bool(folders) and all(_files(f) and not _subfolders(f) for f in folders)


def _read_folder(path: Path) -> Listing:
    """One folder of files per class, named in words (``neutrophil``, ``Lymphozyten``,
    ``Baso``...); detected when every subfolder holds files and no further folders."""
    return Listing(_class_folder_records(path))


# --- CSV manifest --------------------------------------------------------------------------------

MANIFEST_COLUMNS = (
    Column("path", ("path", "file", "filename", "file_name", "filepath", "file_path", "image",
                    "image_path", "image_file", "image_name", "img", "img_path")),
    Column("label", ("label", "class", "class_label", "class_name", "category", "cell_type",
                     "type")),
    Column("patient", ("patient", "patient_id", "subject", "subject_id", "case", "case_id"),
           required=False),
    Column("centre", ("centre", "center", "centre_name", "center_name", "site", "hospital"),
           required=False),
)


def _detect_manifest(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".csv"


def _read_manifest(path: Path) -> Listing:
    """A CSV of ``path,label[,patient][,centre]`` (any header variant, order or delimiter);
    relative paths are relative to it."""
    table = read_label_table(path, MANIFEST_COLUMNS,
                             lambda cells: (path.parent / cells[0]).is_file())
    records = []
    for line, row in table.rows:
        if not row["path"] or not row["label"]:
            raise ValueError(f"manifest {path} line {line}: expected an image path and a "
                             f"label, got {row['path']!r} and {row['label']!r}")
        records.append(SourceRecord(path.parent / row["path"], row["label"],
                                    row.get("patient") or None, row.get("centre") or None))
    return Listing(records, (table.note,))


SOURCE_FORMATS: dict[str, SourceFormat] = {
    "manifest": SourceFormat("CSV file with columns path,label[,patient][,centre] (any "
                             "header variant, order, comma/semicolon/tab)",
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


def read_records(path: Path, fmt: str = "auto") -> tuple[str, Listing]:
    """The format (detected when ``auto``) and the listing of the source at ``path``."""
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
