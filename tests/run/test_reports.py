"""Likely reasons for unresolved queries and the report written next to the output."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from esm2_batch.records import GeneIsoforms, Isoform
from esm2_batch.run.reports import (
    REPORT_COLUMNS,
    case_insensitive_matches,
    unresolved_report_path,
    write_unresolved_report,
)
from esm2_batch.sources.unresolved import likely_reason


@pytest.mark.parametrize(("query", "status", "species", "expected"), [
    ("BRAF", "ok", None, ""),
    ("MALAT1", "no_protein", None, "non-coding gene"),
    ("BRAF", "incomplete", None, "not returned by Ensembl; rerun the same command"),
    ("RP11-34P13.3", "not_found", None, "old clone-based name (RP11-"),
    ("CTD-2510F5.4", "not_found", None, "old clone-based name"),
    ("AC012345.1", "not_found", None, "clone-based name (AC..., AL...)"),
    ("MIR155HG", "not_found", None, "non-coding gene by its name"),
    ("LINC00115", "not_found", None, "non-coding gene by its name"),
    ("FAM41C-AS1", "not_found", None, "non-coding gene by its name"),
    ("Y_RNA", "not_found", None, "RNA family name"),
    ("RPL13P12", "not_found", None, "ribosomal protein pseudogene"),
    ("1-Mar", "not_found", None, "turned into a date"),
    ("SEPT7", "not_found", None, "now SEPTIN7"),
    ("MARCH1", "not_found", None, "now MARCHF1"),
    ("LOC100287534", "not_found", None, "NCBI placeholder"),
    ("Gm12345", "not_found", "mus_musculus", "predicted-gene name"),
    ("ENST00000646891", "not_found", None, "a transcript ID (ENST), not a gene ID"),
    ("ENSP00000493543.1", "not_found", None, "a protein ID (ENSP)"),
    ("ENSMUSG00000002413", "not_found", "homo_sapiens", "of mus_musculus, but the run's"),
    ("ENSG00000157764", "not_found", "mus_musculus", "of homo_sapiens, but the run's"),
    ("ENSG00000999999.3", "not_found", "homo_sapiens", "www.ensembl.org/id/ENSG00000999999"),
    ("Braf", "not_found", "homo_sapiens", "mouse-style symbol"),
    ("C1orf112X", "not_found", "homo_sapiens", "unknown symbol"),
    ("FOOBAR1", "not_found", "mus_musculus", "human-style symbol"),
    ("FOOBAR1", "not_found", None, "unknown symbol: renamed"),
    ("TBCE-1", "not_found", None, "var_names_make_unique"),
])
def test_likely_reason(query: str, status: str, species: str | None, expected: str) -> None:
    reason = likely_reason(query, status, species=species)
    assert expected in reason if expected else reason == ""


def _gene(query: str, status: str, *, gene_id: str | None = None,
          symbol: str | None = None) -> GeneIsoforms:
    isoforms = (Isoform("ENSP1", "ENST1", gene_id or "ENSG1", "MK", True, "protein_coding"),)
    return GeneIsoforms(query, gene_id, symbol, isoforms if status == "ok" else (), status)


def test_report_lists_only_unresolved_queries(tmp_path: Path) -> None:
    genes = [_gene("BRAF", "ok", gene_id="ENSG00000157764", symbol="BRAF"),
             _gene("MALAT1", "no_protein", gene_id="ENSG00000251562", symbol="MALAT1"),
             _gene("RP11-34P13.3", "not_found")]
    path = write_unresolved_report(unresolved_report_path(tmp_path / "esm_all.pt"), genes,
                                   species="homo_sapiens")
    assert path == tmp_path / "esm_all.unresolved.tsv"
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    assert tuple(rows[0]) == REPORT_COLUMNS
    assert [r[:4] for r in rows[1:]] == [["MALAT1", "no_protein", "ENSG00000251562", "MALAT1"],
                                         ["RP11-34P13.3", "not_found", "", ""]]
    assert rows[2][4].startswith("old clone-based name")


def test_no_report_when_everything_resolved_and_a_stale_one_goes(tmp_path: Path) -> None:
    path = tmp_path / "esm_all.unresolved.tsv"
    path.write_text("old\n")
    assert write_unresolved_report(path, [_gene("BRAF", "ok", symbol="BRAF")]) is None
    assert not path.exists()


def test_case_insensitive_matches() -> None:
    genes = [_gene("braf", "ok", symbol="BRAF"), _gene("BRAF", "ok", symbol="BRAF"),
             _gene("ENSG00000157764", "ok", symbol="BRAF"), _gene("tp53", "not_found")]
    assert case_insensitive_matches(genes) == [("braf", "BRAF")]
