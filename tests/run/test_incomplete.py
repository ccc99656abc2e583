"""Sequences Ensembl drops for good: the gene is "incomplete", said in the summary, the
report and meta (never "no_protein", never a clean exit under --strict); a drop the
client's second request recovers leaves no trace."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.errors import EnsemblError
from esm2_batch.models import LoadedModel
from esm2_batch.nn import EsmFileWarning, load_esm_matrix
from esm2_batch.outputs.export import export_genes
from esm2_batch.records import GeneIsoforms, Isoform
from esm2_batch.run.config import RunConfig
from esm2_batch.run.gene_mode import run
from esm2_batch.run.reports import incomplete_reason, unresolved_rows
from tests.fakes.ensembl import FakeEnsembl, synthetic_genes
from tests.run.flat import make_config


def _protein(gene: int, k: int) -> str:
    """The ENSP synthetic_genes gives isoform k of GENE<gene> (k = 0 is canonical)."""
    return f"ENSP{900000000 + gene * 100 + k:011d}"


CANONICAL, SECOND, THIRD = _protein(1, 0), _protein(1, 1), _protein(1, 2)
QUERIES = ["GENE0001", "GENE0002"]


@pytest.fixture
def fake() -> Iterator[FakeEnsembl]:
    server = FakeEnsembl(synthetic_genes(3, coding=3, nmd=0), drop_once=False)
    with server.running_in_thread():
        yield server


def config_for(tmp_path: Path, fake: FakeEnsembl, queries: list[str] = QUERIES,
               **flags: object) -> RunConfig:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(queries) + "\n")
    options: dict[str, object] = {"hvg_file": hvg, "out": tmp_path / "esm_all.pt",
                                  "ensembl_url": fake.url, "rate_limit": 1000.0,
                                  "progress": False, "toks_per_batch": 2048}
    return make_config(**{**options, **flags})


def report(tmp_path: Path) -> dict[str, list[str]]:
    with open(tmp_path / "esm_all.unresolved.tsv", newline="") as handle:
        return {row[0]: row[1:] for row in csv.reader(handle, delimiter="\t")}


def test_a_persistently_dropped_isoform_makes_the_gene_incomplete(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> None:
    fake.drop_ids = {THIRD}
    summary = run(config_for(tmp_path, fake), model=model)
    data = torch.load(tmp_path / "esm_all.pt", weights_only=True)
    rows = data["gene_to_isoform_indices"]["GENE0001"]
    assert [data["protein_ids"][i] for i in rows] == [CANONICAL, SECOND]  # the rest kept
    assert len(data["gene_to_isoform_indices"]["GENE0002"]) == 3
    meta = data["meta"]
    assert meta["status"] == {"GENE0001": "incomplete", "GENE0002": "ok"}
    assert meta["incomplete"] == 1 and meta["missing_protein_ids"] == {"GENE0001": [THIRD]}
    assert meta["canonical_missing"] == {}
    assert summary.incomplete == ["GENE0001"] and summary.complete == 1
    assert summary.missing_sequences == [THIRD] and summary.no_protein == []
    assert ("incomplete: 1 genes (1 sequences missing): GENE0001; see "
            "esm_all.unresolved.tsv") in summary.lines()
    assert report(tmp_path)["GENE0001"] == [
        "incomplete", "ENSG00900000001", "GENE0001",
        f"1 of 3 protein sequences not returned by Ensembl ({THIRD}); "
        "rerun the same command to retry"]


def test_a_dropped_canonical_is_said_first_row_is_not_canonical(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> None:
    fake.drop_ids = {CANONICAL}
    summary = run(config_for(tmp_path, fake), model=model)
    data = torch.load(tmp_path / "esm_all.pt", weights_only=True)
    first = data["gene_to_isoform_indices"]["GENE0001"][0]
    assert data["protein_ids"][first] != CANONICAL
    assert data["meta"]["canonical_missing"] == {"GENE0001": CANONICAL}
    assert summary.canonical_missing == ["GENE0001"]
    assert any("canonical isoform missing, first row not canonical: GENE0001" in line
               for line in summary.lines())
    assert "canonical missing" in report(tmp_path)["GENE0001"][3]
    # consumers that take "the canonical row" say that this one is not
    exported = export_genes(tmp_path / "esm_all.pt", fmt="npz", out=tmp_path / "genes.npz")
    assert exported.not_canonical == ("GENE0001",)
    assert any("first isoform used" in line for line in exported.lines())
    with pytest.warns(EsmFileWarning, match="canonical isoform was not returned"):
        load_esm_matrix(tmp_path / "esm_all.pt", ["GENE0001", "GENE0002"])
    mean = export_genes(tmp_path / "esm_all.pt", fmt="npz", out=tmp_path / "mean.npz",
                        gene_pooling="mean")
    assert mean.not_canonical == ()  # a mean of the isoforms claims no canonical row


def test_every_sequence_dropped_is_incomplete_not_no_protein(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> None:
    fake.drop_ids = {CANONICAL, SECOND, THIRD}
    summary = run(config_for(tmp_path, fake), model=model)
    data = torch.load(tmp_path / "esm_all.pt", weights_only=True)
    assert data["gene_to_isoform_indices"]["GENE0001"] == []
    assert data["meta"]["status"]["GENE0001"] == "incomplete"
    assert summary.no_protein == [] and summary.incomplete == ["GENE0001"]
    assert report(tmp_path)["GENE0001"][3].startswith(
        "3 of 3 protein sequences not returned by Ensembl")


def test_a_transient_drop_recovered_by_the_retry_ends_ok(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> None:
    fake.drop_ids, fake.drop_once = {CANONICAL, THIRD}, True
    summary = run(config_for(tmp_path, fake, strict=True), model=model)
    data = torch.load(tmp_path / "esm_all.pt", weights_only=True)
    assert data["meta"]["status"] == {"GENE0001": "ok", "GENE0002": "ok"}
    assert data["meta"]["incomplete"] == 0 and data["meta"]["missing_protein_ids"] == {}
    assert data["protein_ids"][0] == CANONICAL and len(data["protein_ids"]) == 6
    assert summary.incomplete == [] and not any("incomplete" in s for s in summary.lines())
    assert not (tmp_path / "esm_all.unresolved.tsv").exists()


def test_strict_raises_after_writing_the_file(tmp_path: Path, fake: FakeEnsembl,
                                              model: LoadedModel) -> None:
    fake.drop_ids = {THIRD}
    with pytest.raises(EnsemblError) as info:
        run(config_for(tmp_path, fake, strict=True), model=model)
    assert info.value.queries == ("GENE0001",)
    assert str(info.value).startswith("--strict: 1 genes incomplete, 1 protein sequences "
                                      "missing;")
    assert len(torch.load(tmp_path / "esm_all.pt", weights_only=True)["protein_ids"]) == 5
    assert (tmp_path / "esm_all.unresolved.tsv").exists()


def test_a_reused_incomplete_gene_keeps_its_status_and_report_line(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> None:
    fake.drop_ids = {CANONICAL}
    run(config_for(tmp_path, fake), model=model)
    summary = run(config_for(tmp_path, fake, [*QUERIES, "GENE0003"]), model=model)
    meta = torch.load(tmp_path / "esm_all.pt", weights_only=True)["meta"]
    assert meta["status"]["GENE0001"] == "incomplete" and meta["incomplete"] == 1
    assert meta["missing_protein_ids"] == {"GENE0001": [CANONICAL]}
    assert meta["canonical_missing"] == {"GENE0001": CANONICAL}
    assert summary.incomplete == ["GENE0001"] and summary.canonical_missing == ["GENE0001"]
    assert report(tmp_path)["GENE0001"][3] == (
        f"1 of 3 protein sequences not returned by Ensembl ({CANONICAL}, canonical "
        "missing); rerun the same command to retry")


@pytest.mark.parametrize("strict", [False, True])
def test_cli_strict_exits_3_and_keeps_the_file(tmp_path: Path, fake: FakeEnsembl,
                                               checkpoint: Path, strict: bool) -> None:
    fake.drop_ids = {THIRD}
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("GENE0001\nGENE0002\n")
    out = tmp_path / "e.pt"
    args = ["--hvg_file", str(hvg), "--out", str(out), "--model_path", str(checkpoint),
            "--ensembl_url", fake.url, "--rate_limit", "100"]
    result = CliRunner().invoke(app, [*args, "--strict"] if strict else args)
    assert out.exists()
    if strict:
        assert result.exit_code == 3, result.stderr
        assert result.stderr.startswith("esm2-batch: error: --strict: 1 genes incomplete")
        assert result.stderr.rstrip().endswith("(genes: GENE0001)")
    else:
        assert result.exit_code == 0, result.stderr
        assert "incomplete: 1 genes (1 sequences missing): GENE0001" in result.stdout


# -- records and the report, without a run --------------------------------------------------
def _iso(protein_id: str, canonical: bool = False) -> Isoform:
    return Isoform(protein_id, "ENST1", "ENSG1", "MK", canonical, "protein_coding")


def test_record_invariants() -> None:
    with pytest.raises(ValueError, match="status 'ok' with 1 isoforms and 1 missing"):
        GeneIsoforms("A", "ENSG1", "A", (_iso("P1", True),), "ok", ("P2",))
    with pytest.raises(ValueError, match="'no_protein'"):
        GeneIsoforms("A", "ENSG1", "A", (), "no_protein", ("P2",))
    with pytest.raises(ValueError, match="'incomplete'"):
        GeneIsoforms("A", "ENSG1", "A", (_iso("P1", True),), "incomplete")
    gene = GeneIsoforms("A", "ENSG1", "A", (), "incomplete", ("P1",), "P1")
    assert gene.canonical_missing and GeneIsoforms.from_dict(gene.to_dict()) == gene


def test_old_cache_lines_still_load() -> None:
    """isoforms.jsonl written before "incomplete" and canonical_protein_id existed."""
    iso = {"protein_id": "P1", "transcript_id": "T1", "gene_id": "ENSG1", "sequence": "MK",
           "is_canonical": True, "biotype": "protein_coding"}
    old = {"query": "A", "gene_id": "ENSG1", "symbol": "A", "isoforms": [iso],
           "status": "ok", "missing_protein_ids": ["P2"]}
    gene = GeneIsoforms.from_dict(old)
    assert gene.status == "incomplete" and gene.canonical_protein_id is None
    assert not gene.canonical_missing
    empty = GeneIsoforms.from_dict({**old, "isoforms": [], "status": "no_protein"})
    assert empty.status == "incomplete"
    assert GeneIsoforms.from_dict({**old, "missing_protein_ids": []}).status == "ok"


def test_incomplete_reason_tells_ensembl_gaps_from_embedding_failures() -> None:
    assert incomplete_reason(["P2", "P3"], rows=1, canonical_missing=True, failed={"P3"}) == (
        "1 of 3 protein sequences not returned by Ensembl (P2, canonical missing); rerun "
        "the same command to retry; 1 of 3 protein sequences failed to embed (P3; see the "
        ".failed.tsv file)")
    gene = GeneIsoforms("A", "ENSG1", "A", (_iso("P1", True),), "incomplete", ("P2",), "P1")
    assert unresolved_rows([gene])[0][4] == (
        "1 of 2 protein sequences not returned by Ensembl (P2); rerun the same command "
        "to retry")
