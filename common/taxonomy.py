"""Target class vocabularies and the explicit per-source tables that map onto them.

Every source names its classes its own way; the source vocabulary of a class is written
``"<format>:<source class>"`` (``"pbc:ig/MY"``, ``"matek:NGS"``, ``"zheng:4"``). Each table row
maps one source class to its ``wbc5`` and its ``wbc13`` class; ``None`` means the class has no
target in that taxonomy and its images are dropped and counted (``dropped:<source class>``),
never merged into a neighbour. A source class missing from its table is dropped the same way.

Lookups ignore case and punctuation (``"Band Neutrophils"`` finds ``band_neutrophil``) and
accept a trailing plural ``s``.

Decisions worth knowing:

* ``wbc5`` keeps the mature leukocytes every public centre shares. Band and segmented
  neutrophils are neutrophils and typical and atypical (reactive) lymphocytes are lymphocytes,
  as a five-part differential counts them; blasts, immature granulocytes, erythroblasts,
  smudge cells and platelets have no ``wbc5`` class.
* ``wbc13`` is the harmonisation of Matek-19, INT-20 and Acevedo-20. Classes a source does
  not resolve finely enough are dropped from it: PBC's unspecified ``NEUTROPHIL`` and ``IG``
  prefixes, and plain "neutrophil" from BCCD, Raabin and Zheng (band or segmented unknown).
  Plain "lymphocyte" is ``lymphocyte_typical``: those sources label atypical cells separately
  or not at all, and their lymphocytes are normal ones.
* Matek-19 ``MOB`` is a monoblast, an immature malignant cell and not a monocyte; neither
  taxonomy has a blast of the monocytic line, so it is dropped from both rather than merged
  into ``monocyte`` or ``myeloblast``. ``PMB`` (bilobed promyelocyte) is a promyelocyte.
"""

from __future__ import annotations

import re

TAXONOMIES: dict[str, tuple[str, ...]] = {
    "wbc5": ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"),
    "wbc13": ("basophil", "eosinophil", "erythroblast", "myeloblast", "promyelocyte",
              "myelocyte", "metamyelocyte", "neutrophil_banded", "neutrophil_segmented",
              "monocyte", "lymphocyte_typical", "lymphocyte_atypical", "smudge_cell"),
}

# Every table row is (wbc5 class, wbc13 class), in the order of this tuple.
MAPPED_TAXONOMIES = ("wbc5", "wbc13")

Row = tuple[str | None, str | None]

# PBC / Acevedo-20: folder name, or "folder/PREFIX" where the file prefix splits the folder.
# A file in a split folder whose prefix is not listed keeps the plain folder name.
PBC: dict[str, Row] = {
    "basophil": ("basophil", "basophil"),
    "eosinophil": ("eosinophil", "eosinophil"),
    "erythroblast": (None, "erythroblast"),
    "ig/PMY": (None, "promyelocyte"),
    "ig/MY": (None, "myelocyte"),
    "ig/MMY": (None, "metamyelocyte"),
    "ig/IG": (None, None),  # immature granulocyte, stage not given
    "ig": (None, None),
    "lymphocyte": ("lymphocyte", "lymphocyte_typical"),
    "monocyte": ("monocyte", "monocyte"),
    "neutrophil/SNE": ("neutrophil", "neutrophil_segmented"),
    "neutrophil/BNE": ("neutrophil", "neutrophil_banded"),
    "neutrophil/NEUTROPHIL": ("neutrophil", None),  # band or segmented not given
    "neutrophil": ("neutrophil", None),
    "platelet": (None, None),
}

# Matek-19 / AML-Cytomorphology_LMU: folder codes.
MATEK: dict[str, Row] = {
    "BAS": ("basophil", "basophil"),
    "EBO": (None, "erythroblast"),
    "EOS": ("eosinophil", "eosinophil"),
    "KSC": (None, "smudge_cell"),
    "LYA": ("lymphocyte", "lymphocyte_atypical"),
    "LYT": ("lymphocyte", "lymphocyte_typical"),
    "MMZ": (None, "metamyelocyte"),
    "MOB": (None, None),  # monoblast
    "MON": ("monocyte", "monocyte"),
    "MYB": (None, "myelocyte"),
    "MYO": (None, "myeloblast"),
    "NGB": ("neutrophil", "neutrophil_banded"),
    "NGS": ("neutrophil", "neutrophil_segmented"),
    "PMB": (None, "promyelocyte"),  # bilobed promyelocyte
    "PMO": (None, "promyelocyte"),
}

# Zheng-18 (segmentation_WBC): the codes of "Class Labels of Dataset N.csv".
ZHENG: dict[str, Row] = {
    "1": ("neutrophil", None),
    "2": ("lymphocyte", "lymphocyte_typical"),
    "3": ("monocyte", "monocyte"),
    "4": ("eosinophil", "eosinophil"),
    "5": ("basophil", "basophil"),
}

# Class names in words: BCCD and Raabin-WBC folders, generic class folders, manifest labels.
NAMED: dict[str, Row] = {
    "neutrophil": ("neutrophil", None),
    "lymphocyte": ("lymphocyte", "lymphocyte_typical"),
    "monocyte": ("monocyte", "monocyte"),
    "eosinophil": ("eosinophil", "eosinophil"),
    "basophil": ("basophil", "basophil"),
    "erythroblast": (None, "erythroblast"),
    "myeloblast": (None, "myeloblast"),
    "promyelocyte": (None, "promyelocyte"),
    "myelocyte": (None, "myelocyte"),
    "metamyelocyte": (None, "metamyelocyte"),
    "neutrophil_banded": ("neutrophil", "neutrophil_banded"),
    "band_neutrophil": ("neutrophil", "neutrophil_banded"),
    "neutrophil_segmented": ("neutrophil", "neutrophil_segmented"),
    "segmented_neutrophil": ("neutrophil", "neutrophil_segmented"),
    "lymphocyte_typical": ("lymphocyte", "lymphocyte_typical"),
    "typical_lymphocyte": ("lymphocyte", "lymphocyte_typical"),
    "lymphocyte_atypical": ("lymphocyte", "lymphocyte_atypical"),
    "atypical_lymphocyte": ("lymphocyte", "lymphocyte_atypical"),
    "smudge_cell": (None, "smudge_cell"),
    "immature_granulocyte": (None, None),
    "platelet": (None, None),
}

MAPPINGS: dict[str, dict[str, Row]] = {
    "pbc": PBC,
    "matek": MATEK,
    "zheng": ZHENG,
    "bccd": NAMED,
    "raabin": NAMED,
    "folder": NAMED,
    "manifest": NAMED,
}


def normalise_class_name(name: str) -> str:
    """Lower case, runs of anything but letters, digits and ``/`` turned into one ``_``."""
    return re.sub(r"[^0-9a-z/]+", "_", name.casefold()).strip("_")


_NORMALISED: dict[str, dict[str, Row]] = {
    fmt: {normalise_class_name(source): row for source, row in table.items()}
    for fmt, table in MAPPINGS.items()
}


def map_label(fmt: str, source_class: str, taxonomy: str) -> str | None:
    """The ``taxonomy`` class of ``source_class`` read from a ``fmt`` source, None if dropped."""
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"unknown taxonomy {taxonomy!r}; known: {', '.join(TAXONOMIES)}")
    if fmt not in _NORMALISED:
        raise ValueError(f"no class mapping for format {fmt!r}; known: {', '.join(MAPPINGS)}")
    table = _NORMALISED[fmt]
    key = normalise_class_name(source_class)
    row = table.get(key) or table.get(key.removesuffix("s"))
    return None if row is None else row[MAPPED_TAXONOMIES.index(taxonomy)]
