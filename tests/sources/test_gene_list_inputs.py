"""Gene lists that are not what they seem (issue 25, items 1-2): a FASTA handed over as a
gene list, and CSV/TSV tables whose gene column must be found by what it holds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from esm2_batch import InputError, read_gene_list
from esm2_batch.sources.gene_lists import INPUTS_LOGGER

DATA = Path(__file__).resolve().parents[2] / "data"
FASTA = (">sp|P02775|CXCL7_HUMAN Platelet basic protein OS=Homo sapiens\n"
         "MSLRLDTTPSCNSARPLHALQVLLLLSLLLTALASSTKGQTKRNLAKGKEESLDSDLYAEL\n"
         "RCMCIKTTSGIHPKNIQSLEVIGKGTHCNQVEVIATLKDGRKICLDPDAPRIKKIVQKKLAGDESAD\n"
         ">sp|P02776|PLF4_HUMAN Platelet factor 4\n"
         "MSSAAGFCASRPGLLFLGLLLLPLVVAFASAEAEEDGDLQCLCVKTTSQVRPRHITSLEVIKAGPHCPTAQ\n")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- 1. a FASTA is not a gene list --------------------------------------------------------
@pytest.mark.parametrize("name", ["proteins.fasta", "hvg.txt", "genes"])
def test_a_fasta_is_refused_pointing_at_the_fasta_command(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, FASTA)
    with pytest.raises(InputError) as caught:
        read_gene_list(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert f"esm2-batch fasta {path}" in message and "line 1" in message
    assert "MSLRLDTT" not in message  # names the line, never echoes kilobytes of sequence


def test_sequences_without_headers_are_refused(tmp_path: Path) -> None:
    body = "".join(line + "\n" for line in FASTA.splitlines() if not line.startswith(">"))
    path = write(tmp_path, "seqs.txt", "# my proteins\n" + body)
    with pytest.raises(InputError, match=r"line 2 .*protein sequence.*esm2-batch fasta"):
        read_gene_list(path)


def test_short_symbols_of_amino_acid_letters_are_genes(tmp_path: Path) -> None:
    symbols = ["CD", "ACE", "MYC", "SHARPIN", "DRAXIN", "ARHGDIA", "TRIM", "HLA-DRA"]
    path = write(tmp_path, "hvg.txt", "\n".join(symbols) + "\n")
    assert read_gene_list(path).genes == tuple(symbols)


def test_the_real_hvg_list_is_still_a_gene_list() -> None:
    genes = read_gene_list(DATA / "hvg_pbmc3k_seurat_v3_top2000.txt")
    assert len(genes.genes) == 2000 and genes.column is None


# -- 2. which column of a table holds the genes ------------------------------------------
SCANPY = ("group,names,scores,pvals,pvals_adj,logfoldchanges\n"
          "0,PPBP,25.1,1e-30,2e-27,5.1\n0,PF4,24.0,3e-29,4e-26,4.9\n"
          "1,LYZ,20.2,1e-20,1e-17,3.3\n1,S100A8,19.9,2e-20,2e-17,3.1\n")


@pytest.mark.parametrize(("name", "text", "column", "genes"), [
    ("scanpy.csv", SCANPY, "names", ("PPBP", "PF4", "LYZ", "S100A8")),
    ("scanpy_celltypes.csv",  # group labels that look like symbols (B, NK) lose to names
     "group,names,scores\nB,MS4A1,9.1\nB,CD79A,8.0\nNK,GNLY,7.7\nNK,NKG7,7.1\n",
     "names", ("MS4A1", "CD79A", "GNLY", "NKG7")),
    ("findmarkers.csv",  # R's write.csv: row names under an empty first header cell
     '"","p_val","avg_log2FC","pct.1","pct.2","p_val_adj"\n'
     '"PPBP",0,5.2,0.9,0.01,0\n"PF4",1e-300,4.8,0.95,0.02,1e-296\n',
     "", ("PPBP", "PF4")),
    ("findmarkers.tsv",  # write.table: the header has no cell for the row names at all
     "p_val\tavg_log2FC\tp_val_adj\nPPBP\t0\t5.2\t0\nPF4\t1e-300\t4.8\t1e-296\n",
     "", ("PPBP", "PF4")),
    ("findallmarkers.csv",  # make.unique row names (PPBP.1): the gene column wins
     '"","p_val","avg_log2FC","cluster","gene"\n"PPBP",0,5.2,"0","PPBP"\n'
     '"LYZ",0,4.1,"1","LYZ"\n"PPBP.1",1e-5,1.1,"1","PPBP"\n',
     "gene", ("PPBP", "LYZ")),
    ("var.csv", "gene_ids,feature_types\nENSG00000163736,Gene Expression\n"
     "ENSG00000163737,Gene Expression\n", "gene_ids", ("ENSG00000163736", "ENSG00000163737")),
    ("census.tsv", "soma_joinid\tfeature_name\tfeature_length\n0\tPPBP\t800\n1\tPF4\t700\n",
     "feature_name", ("PPBP", "PF4")),
    ("upper.csv", "Rank,Gene,LogFC\n1,PPBP,2.0\n2,PF4,1.5\n", "Gene", ("PPBP", "PF4")),
    ("symbols.tsv", "GENE_SYMBOLS\tmean\nPpbp\t0.5\nPf4\t0.4\n", "GENE_SYMBOLS",
     ("Ppbp", "Pf4")),
    ("numbers_named_gene.csv",  # a 'gene' column of numbers is not the genes
     "gene,symbol\n1,BRAF\n2,TP53\n", "symbol", ("BRAF", "TP53")),
    ("unnamed_layout.csv",  # no known name: the column whose values are symbols, and the
     "cluster,marker,score\nC1,PPBP,3\nC1,PF4,2\nC2,LYZ,2\n",  # most distinct of them
     "marker", ("PPBP", "PF4", "LYZ")),
])
def test_the_gene_column_is_the_one_holding_genes(tmp_path: Path, name: str, text: str,
                                                  column: str, genes: tuple[str, ...],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, name, text)
    with caplog.at_level(logging.INFO, logger=INPUTS_LOGGER):
        found = read_gene_list(path)
    assert found.genes == genes and found.column == column
    (said,) = [r.getMessage() for r in caplog.records if r.name == INPUTS_LOGGER]
    assert said.startswith(f"{path}: genes from ")
    assert (f"column {column!r}" if column else "row names") in said


def test_no_gene_like_column_is_one_line_naming_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "scores.csv", "cluster,score,pval\n0,1.5,0.01\n1,2.5,NA\n")
    with pytest.raises(InputError) as caught:
        read_gene_list(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "--gene_column" in message
    assert "cluster, score, pval" in message


def test_a_named_column_is_used_as_given(tmp_path: Path) -> None:
    path = write(tmp_path, "scanpy.csv", SCANPY)
    assert read_gene_list(path, column="group").genes == ("0", "1")  # the user's choice
    assert read_gene_list(path, column="NAMES").column == "names"  # any case
    with pytest.raises(InputError, match=r"no column 'gene'.*group, names.*--gene_column"):
        read_gene_list(path, column="gene")
    rows = write(tmp_path, "fm.csv", '"","p_val"\n"PPBP",0\n')
    assert read_gene_list(rows, column="rownames").genes == ("PPBP",)


def test_a_column_for_a_one_per_line_list_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "hvg.txt", "PPBP\nPF4\n")
    with pytest.raises(InputError, match=r"hvg\.txt.*one gene per line.*--gene_column"):
        read_gene_list(path, column="gene")
