"""Gene lists as users write them, and the records' JSON round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from esm2_batch import GeneIsoforms, InputError, Isoform, read_gene_list
from esm2_batch.records import is_ensembl_gene_id, query_key, strip_version
from esm2_batch.sources.gene_lists import dedupe


def test_text_list_with_bom_crlf_comments_blanks_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "hvg.txt"
    path.write_bytes("\ufeff# top genes\r\nBRAF\r\n\r\nTP53  # tumour suppressor\r\n"
                     "BRAF\r\nENSG00000141510.17\r\nENSG00000141510\r\n".encode())
    genes = read_gene_list(path)
    assert genes.genes == ("BRAF", "TP53", "ENSG00000141510.17")
    assert genes.duplicates == ("BRAF", "ENSG00000141510")


def test_csv_and_tsv_pick_the_gene_column(tmp_path: Path) -> None:
    (tmp_path / "g.csv").write_text("rank,gene_symbol,score\n1,CD3E,2.5\n2,LYZ,1.0\n")
    (tmp_path / "g.tsv").write_text("id\tname\nENSG00000157764\tBRAF\n")
    assert read_gene_list(tmp_path / "g.csv").genes == ("CD3E", "LYZ")
    assert read_gene_list(tmp_path / "g.tsv", column="name").genes == ("BRAF",)
    with pytest.raises(InputError, match="no column 'nope'"):
        read_gene_list(tmp_path / "g.tsv", column="nope")


def test_real_hvg_list_reads_2000_genes() -> None:
    data = Path(__file__).resolve().parents[2] / "data"
    genes = read_gene_list(data / "hvg_pbmc3k_seurat_v3_top2000.txt")
    assert len(genes.genes) == 2000 and genes.genes[0] == "PPBP"


@pytest.mark.parametrize("content", ["", "\n\n# only a comment\n"])
def test_empty_list_is_a_one_line_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(InputError, match=r"empty\.txt: the gene list is empty"):
        read_gene_list(path)


def test_missing_list_names_the_file_and_the_flag(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope.txt: no such gene list file.*--hvg_file"):
        read_gene_list(tmp_path / "nope.txt")


def test_ensembl_ids_and_versions() -> None:
    assert is_ensembl_gene_id("ENSG00000157764") and is_ensembl_gene_id("ENSMUSG00000000001.4")
    assert not is_ensembl_gene_id("BRAF") and not is_ensembl_gene_id("ENST00000646891")
    assert strip_version("ENSG00000157764.13") == "ENSG00000157764"
    assert query_key("RP11-34P13.7") == "RP11-34P13.7"
    assert dedupe(["a", " a ", "", "b"]).genes == ("a", "b")


def test_records_round_trip_and_validate() -> None:
    iso = Isoform("ENSP1", "ENST1", "ENSG1", "MKV", True, "protein_coding")
    gene = GeneIsoforms("G", "ENSG1", "G", (iso,), "incomplete", ("ENSP2",))
    assert GeneIsoforms.from_dict(gene.to_dict()) == gene
    assert gene.canonical == iso
    with pytest.raises(ValueError):
        GeneIsoforms("G", None, None, (iso,), "not_found")
