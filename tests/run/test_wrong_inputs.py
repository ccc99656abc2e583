"""The wrong input through the real command (issue 25, items 1-2): a FASTA as --hvg_file,
a table whose gene column must be found, and a list of which no gene is found. Each used
to exit 0 with an empty or wrong esm_all.pt."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from esm2_batch.cli import app
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.sources.test_gene_list_inputs import FASTA

runner = CliRunner()


@pytest.fixture
def fake() -> Iterator[FakeEnsembl]:
    server = FakeEnsembl([braf(), *synthetic_genes(4)])
    with server.running_in_thread():
        yield server


def embed(tmp_path: Path, fake: FakeEnsembl, checkpoint: Path, hvg: Path, *extra: str
          ) -> Result:
    return runner.invoke(app, ["--hvg_file", str(hvg), "--out", str(tmp_path / "esm_all.pt"),
                               "--model_path", str(checkpoint), "--ensembl_url", fake.url,
                               "--rate_limit", "1000", "--toks_per_batch", "2048", "-q",
                               *extra])


def stderr_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def error_line(result: Result, code: int) -> str:
    """The one stderr line of a refused run, which exited with `code`."""
    lines = stderr_lines(result)
    assert result.exit_code == code and len(lines) == 1, result.stderr
    assert lines[0].startswith("esm2-batch: error: ") and "Traceback" not in result.stderr
    return lines[0]


def genes_written(tmp_path: Path) -> list[str]:
    genes: list[str] = torch.load(tmp_path / "esm_all.pt", weights_only=True)["genes"]
    return genes


def test_a_fasta_as_hvg_file_stops_before_any_request(tmp_path: Path, fake: FakeEnsembl,
                                                      checkpoint: Path) -> None:
    fasta = tmp_path / "proteins.fasta"
    fasta.write_text(FASTA)
    line = error_line(embed(tmp_path, fake, checkpoint, fasta), 2)
    assert f"esm2-batch fasta {fasta}" in line
    assert fake.counts["requests"] == 0 and not (tmp_path / "esm_all.pt").exists()


SCANPY = ("group,names,scores,pvals,pvals_adj,logfoldchanges\n"
          "0,BRAF,25.1,1e-30,2e-27,5.1\n0,GENE0001,24.0,3e-29,4e-26,4.9\n"
          "1,GENE0002,20.2,1e-20,1e-17,3.3\n1,BRAF,19.9,2e-20,2e-17,3.1\n")


def test_scanpy_marker_table_embeds_names_and_says_so_under_quiet(
        tmp_path: Path, fake: FakeEnsembl, checkpoint: Path) -> None:
    table = tmp_path / "markers.csv"
    table.write_text(SCANPY)
    result = embed(tmp_path, fake, checkpoint, table)
    assert result.exit_code == 0, result.stderr
    assert stderr_lines(result) == [f"{table}: genes from column 'names' (4 rows)"]
    assert genes_written(tmp_path) == ["BRAF", "GENE0001", "GENE0002"]


def test_seurat_row_names_are_the_genes(tmp_path: Path, fake: FakeEnsembl,
                                        checkpoint: Path) -> None:
    table = tmp_path / "findmarkers.csv"
    table.write_text('"","p_val","avg_log2FC","pct.1","pct.2","p_val_adj"\n'
                     '"GENE0003",0,5.2,0.9,0.01,0\n"BRAF",1e-300,4.8,0.95,0.02,1e-296\n')
    result = embed(tmp_path, fake, checkpoint, table)
    assert result.exit_code == 0, result.stderr
    (line,) = stderr_lines(result)
    assert line.startswith(f"{table}: genes from the row names") and "(2 rows)" in line
    assert genes_written(tmp_path) == ["GENE0003", "BRAF"]


def test_gene_column_flag_picks_the_column(tmp_path: Path, fake: FakeEnsembl,
                                           checkpoint: Path) -> None:
    table = tmp_path / "two.tsv"
    table.write_text("gene_ids\tsymbol\nENSG00000157764\tBRAF\nENSG00900000003\tGENE0003\n")
    result = embed(tmp_path, fake, checkpoint, table, "--gene_column", "symbol")
    assert result.exit_code == 0, result.stderr
    assert stderr_lines(result) == [f"{table}: genes from column 'symbol' (2 rows)"]
    assert genes_written(tmp_path) == ["BRAF", "GENE0003"]


def test_no_gene_like_column_is_one_line_exit_2(tmp_path: Path, fake: FakeEnsembl,
                                                 checkpoint: Path) -> None:
    table = tmp_path / "scores.csv"
    table.write_text("cluster,score,pval\n0,1.5,0.01\n1,2.5,0.2\n")
    line = error_line(embed(tmp_path, fake, checkpoint, table), 2)
    assert str(table) in line and "cluster, score, pval" in line and "--gene_column" in line
    assert fake.counts["requests"] == 0


@pytest.mark.parametrize("flag", ["--gene_column", "--id-column"])
def test_a_missing_gene_column_is_one_line_exit_2(tmp_path: Path, fake: FakeEnsembl,
                                                  checkpoint: Path, flag: str) -> None:
    table = tmp_path / "markers.csv"
    table.write_text(SCANPY)
    line = error_line(embed(tmp_path, fake, checkpoint, table, flag, "gene"), 2)
    assert "no column 'gene'" in line and "names" in line


def test_every_gene_not_found_exits_3_and_blocks_no_rerun(tmp_path: Path, fake: FakeEnsembl,
                                                         checkpoint: Path) -> None:
    hvg = tmp_path / "mouse.txt"
    hvg.write_text("Nope1\nNope2\nNope3\n")
    line = error_line(embed(tmp_path, fake, checkpoint, hvg), 3)
    assert "none of the 3 genes" in line and "--species" in line and "Nope1" in line
    assert not (tmp_path / "esm_all.pt").exists()  # an empty file would only mislead
    assert not (tmp_path / "esm_all.pt.partial").exists()
    hvg.write_text("BRAF\nNope1\n")  # the corrected rerun, other settings: not refused
    result = embed(tmp_path, fake, checkpoint, hvg, "--species", "mus_musculus")
    assert result.exit_code == 0, result.stderr
    assert genes_written(tmp_path) == ["BRAF", "Nope1"]
