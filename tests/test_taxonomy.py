"""Target vocabularies and the per-source mapping tables."""

from __future__ import annotations

import pytest

from common.taxonomy import (
    ALIASES,
    MAPPED_TAXONOMIES,
    MAPPINGS,
    MATEK,
    NAMED,
    TAXONOMIES,
    LabelMatch,
    check_class_map,
    map_label,
    match_label,
    normalise_class_name,
)


def test_vocabularies_in_their_documented_order():
    assert TAXONOMIES["wbc5"] == ("neutrophil", "lymphocyte", "monocyte", "eosinophil",
                                  "basophil")
    assert TAXONOMIES["wbc13"] == (
        "basophil", "eosinophil", "erythroblast", "myeloblast", "promyelocyte", "myelocyte",
        "metamyelocyte", "neutrophil_banded", "neutrophil_segmented", "monocyte",
        "lymphocyte_typical", "lymphocyte_atypical", "smudge_cell")
    assert set(MAPPED_TAXONOMIES) == set(TAXONOMIES)


@pytest.mark.parametrize("fmt", sorted(MAPPINGS))
def test_every_table_maps_into_its_taxonomies_without_name_clashes(fmt):
    table = MAPPINGS[fmt]
    assert len({normalise_class_name(name) for name in table}) == len(table)
    for row in table.values():
        for taxonomy, target in zip(MAPPED_TAXONOMIES, row, strict=True):
            assert target is None or target in TAXONOMIES[taxonomy]


@pytest.mark.parametrize(("source", "wbc5", "wbc13"), [
    ("neutrophil/SNE", "neutrophil", "neutrophil_segmented"),
    ("neutrophil/BNE", "neutrophil", "neutrophil_banded"),
    ("neutrophil/NEUTROPHIL", "neutrophil", None),
    ("ig/PMY", None, "promyelocyte"),
    ("ig/MY", None, "myelocyte"),
    ("ig/MMY", None, "metamyelocyte"),
    ("ig/IG", None, None),
    ("erythroblast", None, "erythroblast"),
    ("lymphocyte", "lymphocyte", "lymphocyte_typical"),
    ("platelet", None, None),
])
def test_pbc_prefixes(source, wbc5, wbc13):
    assert map_label("pbc", source, "wbc5") == wbc5
    assert map_label("pbc", source, "wbc13") == wbc13


def test_matek_codes_cover_the_dataset_and_drop_monoblasts():
    assert set(MATEK) == {"BAS", "EBO", "EOS", "KSC", "LYA", "LYT", "MMZ", "MOB", "MON", "MYB",
                          "MYO", "NGB", "NGS", "PMB", "PMO"}
    assert map_label("matek", "MOB", "wbc5") is None
    assert map_label("matek", "MOB", "wbc13") is None
    assert map_label("matek", "PMB", "wbc13") == "promyelocyte"
    assert map_label("matek", "KSC", "wbc13") == "smudge_cell"
    assert map_label("matek", "LYA", "wbc13") == "lymphocyte_atypical"
    assert map_label("matek", "NGS", "wbc5") == "neutrophil"


def test_zheng_codes():
    assert [map_label("zheng", str(code), "wbc5") for code in range(1, 6)] == list(
        TAXONOMIES["wbc5"])


def test_named_classes_ignore_case_punctuation_and_plurals():
    assert map_label("raabin", "NEUTROPHIL", "wbc5") == "neutrophil"
    assert map_label("bccd", "Lymphocyte", "wbc13") == "lymphocyte_typical"
    assert map_label("folder", "Band Neutrophils", "wbc13") == "neutrophil_banded"
    assert map_label("manifest", "smudge-cell", "wbc13") == "smudge_cell"
    assert map_label("folder", "Neutrophil", "wbc13") is None  # band or segmented unknown
    assert map_label("folder", "artefact", "wbc5") is None


def test_unknown_taxonomy_or_format_is_an_error():
    with pytest.raises(ValueError, match=r"taxonomy 'wbc7'.*wbc5"):
        map_label("pbc", "basophil", "wbc7")
    with pytest.raises(ValueError, match="format 'tiff'"):
        map_label("tiff", "basophil", "wbc5")


@pytest.mark.parametrize(("source", "wbc5", "rule"), [
    ("neut", "neutrophil", "alias of neutrophil"),
    ("Lymp", "lymphocyte", "alias of lymphocyte"),
    ("mono", "monocyte", "alias of monocyte"),
    ("eos", "eosinophil", "alias of eosinophil"),
    ("Baso", "basophil", "alias of basophil"),
    ("Basos", "basophil", "alias of basophil"),
    ("Neutrófilos", "neutrophil", "alias of neutrophil"),
    ("Lymphozyten", "lymphocyte", "alias of lymphocyte"),
    ("linfociti", "lymphocyte", "alias of lymphocyte"),
    ("éosinophiles", "eosinophil", "alias of eosinophil"),
    ("Eosinophils", "eosinophil", "table"),
    ("lymphocite", "lymphocyte", "typo of lymphocyte"),
    ("Esoinophil", "eosinophil", "typo of eosinophil"),
    ("monocytess", "monocyte", "typo of monocyte"),
    ("PLT", None, "alias of platelet"),  # known, no wbc5 class: dropped
])
def test_lab_folder_names_by_abbreviation_plural_language_or_typo(source, wbc5, rule):
    assert match_label("folder", source, "wbc5") == LabelMatch(wbc5, rule)


@pytest.mark.parametrize("source", ["Blasts", "seg", "myelo", "cells", "lymhp", "Neutrophilic",
                                    "artefact", "7"])
def test_names_nothing_matches_are_unknown_never_guessed(source):
    match = match_label("folder", source, "wbc5")
    assert match.target is None and not match.known


def test_class_map_comes_first_for_any_format():
    class_map = {"Blasts": "drop", "neutrophil": "drop", "Grans": "neutrophil", "5": "drop",
                 "Lymphocyte": "monocyte"}
    matched = {(fmt, source): match_label(fmt, source, "wbc5", class_map)
               for fmt, source in [("folder", "BLASTS"), ("folder", "grans"),
                                   ("bccd", "Lymphocytes"), ("pbc", "neutrophil/SNE"),
                                   ("zheng", "5")]}
    assert {key: m.target for key, m in matched.items()} == {
        ("folder", "BLASTS"): None, ("folder", "grans"): "neutrophil",
        ("bccd", "Lymphocytes"): "monocyte", ("pbc", "neutrophil/SNE"): None,
        ("zheng", "5"): None}
    assert {m.rule for m in matched.values()} == {"class map"}
    assert match_label("zheng", "4", "wbc5", class_map) == LabelMatch("eosinophil", "table")


@pytest.mark.parametrize(("class_map", "message"), [
    ({"Baso": "basophils"}, r"'Baso' maps to 'basophils'; expected a wbc5 class \(neutrophil"),
    ({"Blasts": "myeloblast"}, r"expected a wbc5 class .* or 'drop'"),
    ({"Baso": "basophil", "baso ": "drop"}, r"classes 'Baso' and 'baso ' are the same name"),
])
def test_a_bad_class_map_is_refused(class_map, message):
    with pytest.raises(ValueError, match=message):
        check_class_map(class_map, "wbc5")
    check_class_map({"Blasts": "myeloblast"}, "wbc13")


def test_aliases_name_classes_of_the_table_and_never_clash():
    aliases = [normalise_class_name(a) for names in ALIASES.values() for a in names]
    assert set(ALIASES) <= set(NAMED)
    assert len(set(aliases)) == len(aliases)
    assert not set(aliases) & {normalise_class_name(name) for name in NAMED}
