"""Target class vocabularies and the explicit per-source tables that map onto them.

Every source names its classes its own way; the source vocabulary of a class is written
``"<format>:<source class>"`` (``"pbc:ig/MY"``, ``"matek:NGS"``, ``"zheng:4"``). Each table row
maps one source class to its ``wbc5`` and its ``wbc13`` class; ``None`` means the class has no
target in that taxonomy and its images are dropped and counted (``dropped:<source class>``),
never merged into a neighbour. A source class that nothing matches is ``unknown``: its images
are left out too, and counted apart (``unknown:<source class>``) so that a lab sees it.

Lookups ignore case, accents and punctuation (``"Band Neutrophils"`` finds
``band_neutrophil``) and accept a trailing plural ``s``. A centre's class map
(``[classes]`` in its TOML) comes before the tables; names in words (``NAMED``) are also found
by ``ALIASES`` (abbreviations, other languages) and by a typo one edit from exactly one known
name of at least ``TYPO_MIN_LENGTH`` letters (see :func:`match_label`).

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
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

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


# Other names labs give the classes of ``NAMED`` (folders, manifest labels): abbreviations and
# other languages (Spanish, Portuguese, Italian, German, French). Only names that cannot mean
# another cell: "blast", "myelo", "ly" or "seg" alone stay unknown.
ALIASES: dict[str, tuple[str, ...]] = {
    "neutrophil": ("neut", "neutro", "neu", "pmn", "neutrophile", "neutrofilo", "neutrofili",
                   "neutrophiler_granulozyt", "neutrophile_granulozyten"),
    "neutrophil_segmented": ("segmented", "segmentkernige", "neutrofilo_segmentado"),
    "neutrophil_banded": ("band", "stabkernige", "neutrofilo_en_banda", "cayado"),
    "lymphocyte": ("lymph", "lymp", "lym", "lympho", "lymphozyt", "lymphozyten", "linfocito",
                   "linfociti"),
    "monocyte": ("mono", "mon", "monozyt", "monozyten", "monocito", "monociti"),
    "eosinophil": ("eos", "eosino", "eosinophile", "eosinofilo", "eosinofili",
                   "eosinophiler_granulozyt", "eosinophile_granulozyten"),
    "basophil": ("baso", "bas", "basophile", "basofilo", "basofili", "basophiler_granulozyt",
                 "basophile_granulozyten"),
    "erythroblast": ("nrbc", "normoblast", "eritroblasto", "erythroblaste"),
    "lymphocyte_atypical": ("reactive_lymphocyte", "variant_lymphocyte"),
    "smudge_cell": ("smudge", "gumprecht", "basket_cell"),
    "immature_granulocyte": ("ig",),
    "platelet": ("plt", "thrombocyte", "thrombozyt", "thrombozyten", "plaquette", "plaqueta",
                 "piastrina", "piastrine"),
}

DROP = "drop"  # class-map value: leave the source class out
UNKNOWN = "unknown"  # the rule of a source class that no map, table, alias or typo matched
TYPO_MIN_LENGTH = 7  # a name this long also matches the one known class name one edit away


@dataclass(frozen=True)
class LabelMatch:
    """What a source class becomes: ``target`` (None: left out) and the ``rule`` that said so
    (``class map``, ``table``, ``alias of <name>``, ``typo of <name>`` or ``unknown``)."""

    target: str | None
    rule: str

    @property
    def known(self) -> bool:
        """Whether anything matched; images of an unknown class are left out and reported."""
        return self.rule != UNKNOWN


def normalise_class_name(name: str) -> str:
    """Lower case without accents, runs of anything but letters, digits and ``/`` turned into
    one ``_`` (``"Neutrófilos "`` -> ``"neutrofilos"``)."""
    plain = unicodedata.normalize("NFKD", name.casefold())
    plain = "".join(c for c in plain if not unicodedata.combining(c))
    return re.sub(r"[^0-9a-z/]+", "_", plain).strip("_")


def _singular_forms(key: str) -> tuple[str, ...]:
    """``key`` and, if it ends in ``s``, ``key`` without it."""
    return (key, key[:-1]) if key.endswith("s") and len(key) > 3 else (key,)


_NORMALISED: dict[str, dict[str, Row]] = {
    fmt: {normalise_class_name(source): row for source, row in table.items()}
    for fmt, table in MAPPINGS.items()
}
_ALIAS_OF: dict[str, str] = {normalise_class_name(alias): name
                             for name, aliases in ALIASES.items() for alias in aliases}
_TYPO_CANDIDATES: dict[str, str] = {
    name: _ALIAS_OF.get(name, name)
    for name in (*_NORMALISED["folder"], *_ALIAS_OF) if len(name) >= TYPO_MIN_LENGTH}


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether ``b`` is ``a`` with at most one letter replaced, added, removed or two
    neighbours swapped."""
    if abs(len(a) - len(b)) > 1:
        return False
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a),
                                                                                   len(b)))
    swapped = a[i:i + 2] == b[i:i + 2][::-1] and a[i + 2:] == b[i + 2:]
    return a[i + 1:] == b[i + 1:] or a[i + 1:] == b[i:] or a[i:] == b[i + 1:] or swapped


def _check_names(fmt: str, taxonomy: str) -> None:
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"unknown taxonomy {taxonomy!r}; known: {', '.join(TAXONOMIES)}")
    if fmt not in _NORMALISED:
        raise ValueError(f"no class mapping for format {fmt!r}; known: {', '.join(MAPPINGS)}")


def _table_match(fmt: str, key: str) -> tuple[Row, str] | None:
    """(row, rule) of a normalised source class in the format's table; names in words also by
    alias and by a conservative typo match."""
    table = _NORMALISED[fmt]
    forms = _singular_forms(key)
    row = next((table[form] for form in forms if form in table), None)
    if row is not None:
        return row, "table"
    if MAPPINGS[fmt] is not NAMED:
        return None
    alias = next((form for form in forms if form in _ALIAS_OF), None)
    if alias is not None:
        return NAMED[_ALIAS_OF[alias]], f"alias of {_ALIAS_OF[alias]}"
    if len(key) < TYPO_MIN_LENGTH:
        return None
    near = {name: canonical for name, canonical in _TYPO_CANDIDATES.items()
            if any(_one_edit_apart(form, name) for form in forms)}
    if len({NAMED[canonical] for canonical in near.values()}) != 1:
        return None  # nothing close, or close to two different classes: not guessed
    name = min(near)
    return NAMED[near[name]], f"typo of {name}"


def check_class_map(class_map: Mapping[str, str], taxonomy: str) -> None:
    """Raise ValueError unless every value is a ``taxonomy`` class or ``drop`` and no two
    keys are the same class name once case, accents and punctuation are ignored."""
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"unknown taxonomy {taxonomy!r}; known: {', '.join(TAXONOMIES)}")
    seen: dict[str, str] = {}
    for key, value in class_map.items():
        if value not in (*TAXONOMIES[taxonomy], DROP):
            raise ValueError(f"class {key!r} maps to {value!r}; expected a {taxonomy} class "
                             f"({', '.join(TAXONOMIES[taxonomy])}) or {DROP!r}")
        normalised = normalise_class_name(key)
        if normalised in seen:
            raise ValueError(f"classes {seen[normalised]!r} and {key!r} are the same name")
        seen[normalised] = key


def match_label(fmt: str, source_class: str, taxonomy: str,
                class_map: Mapping[str, str] | None = None) -> LabelMatch:
    """The ``taxonomy`` class of ``source_class`` read from a ``fmt`` source, and why.

    A centre's ``class_map`` (source class -> taxonomy class or ``drop``) comes first; its key
    also matches the classes a folder is split into (``neutrophil`` matches PBC's
    ``neutrophil/SNE``). Then the format's table; names in words also by alias (``Baso``,
    ``Lymphozyten``) and, from ``TYPO_MIN_LENGTH`` letters, by a typo one edit from exactly
    one known class. Anything else is ``unknown``: left out, never guessed.
    """
    _check_names(fmt, taxonomy)
    key = normalise_class_name(source_class)
    mapped = {normalise_class_name(k): v for k, v in (class_map or {}).items()}
    for form in (*_singular_forms(key), key.split("/")[0]):
        if form in mapped:
            return LabelMatch(None if mapped[form] == DROP else mapped[form], "class map")
    found = _table_match(fmt, key)
    if found is None:
        return LabelMatch(None, UNKNOWN)
    row, rule = found
    return LabelMatch(row[MAPPED_TAXONOMIES.index(taxonomy)], rule)


def map_label(fmt: str, source_class: str, taxonomy: str,
              class_map: Mapping[str, str] | None = None) -> str | None:
    """The ``taxonomy`` class of ``source_class`` (None: left out); see :func:`match_label`."""
    return match_label(fmt, source_class, taxonomy, class_map).target
