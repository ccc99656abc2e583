"""--isoforms_set canonical (issue 24): one isoform per gene, fetched and embedded alone,
a subset of `all` that a later `all` run builds on instead of starting over."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.models import LoadedModel
from esm2_batch.records import GeneIsoforms, Isoform
from esm2_batch.run.gene_mode import run
from esm2_batch.run.reports import RunSummary
from esm2_batch.run.subsets import records_for, reusable_for
from esm2_batch.sources.isoform_sets import canonical_only
from esm2_batch.store.esm_file import read_esm_file
from tests.fakes.ensembl import FakeEnsembl, FakeGene, braf, synthetic_genes
from tests.run.flat import make_config

GENES = [braf(), *synthetic_genes(50, coding=2, nmd=1)]
QUERIES = [g.symbol for g in GENES]


@pytest.fixture
def fake() -> Iterator[FakeEnsembl]:
    server = FakeEnsembl(GENES)
    with server.running_in_thread():
        yield server


def gene_run(tmp_path: Path, fake: FakeEnsembl, model: LoadedModel, *, out: str = "esm_all.pt",
             queries: list[str] = QUERIES, **flags: object) -> RunSummary:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(queries) + "\n")
    config = make_config(hvg_file=hvg, out=tmp_path / out, ensembl_url=fake.url,
                         rate_limit=1000.0, progress=False, **flags)
    return run(config, model=model)


def canonical_ids(genes: list[FakeGene]) -> set[str]:
    return {t.protein_id for g in genes for t in g.transcripts
            if t.is_canonical and t.protein_id and t.biotype == "protein_coding"}


def sequence_ids(fake: FakeEnsembl) -> list[str]:
    return [i for endpoint, body in fake.bodies if endpoint == "sequence" for i in body["ids"]]


def test_canonical_requests_and_embeds_only_the_canonical_isoforms(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> None:
    summary = gene_run(tmp_path, fake, model, isoforms_set="canonical")
    assert fake.counts["sequence"] == 2  # 51 genes: one request per 50, no second chance
    assert set(sequence_ids(fake)) == canonical_ids(GENES)
    data = read_esm_file(tmp_path / "esm_all.pt")
    assert data.emb.shape[0] == len(GENES) == summary.embedded_now
    assert all(rows == [n] for n, rows in enumerate(data.gene_to_isoform_indices.values()))
    assert set(data.protein_ids) == canonical_ids(GENES)
    assert data.meta["isoforms_set"] == "canonical"
    assert data.meta["settings"] == read_settings_of_all(tmp_path, fake, model)
    assert any("--isoforms_set canonical" in line for line in summary.lines())


def read_settings_of_all(tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> object:
    """The settings an `all` run records: the set is not among them (rows are shared)."""
    gene_run(tmp_path, fake, model, out="other.pt", queries=QUERIES[:1])
    return read_esm_file(tmp_path / "other.pt").meta["settings"]


def test_rerun_with_all_embeds_only_the_missing_isoforms(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> None:
    canonical = gene_run(tmp_path, fake, model, isoforms_set="canonical")
    first_rows = rows_by_protein(tmp_path / "esm_all.pt")
    every = gene_run(tmp_path, fake, model)  # same --out, default all
    assert every.cached_rows == canonical.embedded_now  # by sequence, from the row cache
    assert every.embedded_now == every.distinct_sequences - canonical.embedded_now
    data = read_esm_file(tmp_path / "esm_all.pt")
    assert data.meta["isoforms_set"] == "all"
    fresh = gene_run(tmp_path, fake, model, out="fresh.pt", cache=False)
    assert read_esm_file(tmp_path / "fresh.pt").protein_ids == data.protein_ids
    assert torch.equal(read_esm_file(tmp_path / "fresh.pt").emb, data.emb)
    now = rows_by_protein(tmp_path / "esm_all.pt")
    assert all(torch.equal(now[p], row) for p, row in first_rows.items())
    assert fresh.distinct_sequences == every.distinct_sequences


def test_canonical_after_all_reuses_the_file_without_any_request(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> None:
    gene_run(tmp_path, fake, model)
    every = read_esm_file(tmp_path / "esm_all.pt")
    fake.counts.clear()
    summary = gene_run(tmp_path, fake, model, isoforms_set="canonical")
    assert fake.counts["lookup"] == fake.counts["sequence"] == 0
    assert summary.embedded_now == 0
    data = read_esm_file(tmp_path / "esm_all.pt")
    firsts = [every.rows_of(g)[0] for g in every.genes]
    assert data.protein_ids == [every.protein_ids[i] for i in firsts]
    assert torch.equal(data.emb, every.emb[firsts])
    assert data.meta["isoforms_set"] == "canonical"


def test_an_isoforms_fasta_obeys_the_set(tmp_path: Path, fake: FakeEnsembl,
                                         model: LoadedModel) -> None:
    fasta = tmp_path / "isoforms.fa"
    gene_run(tmp_path, fake, model, queries=QUERIES[:5], save_isoforms=fasta)
    fake.counts.clear()
    summary = gene_run(tmp_path, fake, model, out="offline.pt", queries=QUERIES[:5],
                       isoforms=fasta, isoforms_set="canonical")
    assert fake.counts["requests"] == 0
    data = read_esm_file(tmp_path / "offline.pt")
    assert set(data.protein_ids) == canonical_ids(GENES[:5]) and summary.isoforms == 5


def test_cli_flag(tmp_path: Path, fake: FakeEnsembl, checkpoint: Path) -> None:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("BRAF\nGENE0001\n")
    base = ["--hvg_file", str(hvg), "--model_path", str(checkpoint), "--device", "cpu",
            "--ensembl_url", fake.url, "--out", str(tmp_path / "e.pt"), "-q"]
    bad = CliRunner().invoke(app, [*base, "--isoforms_set", "some"])
    assert bad.exit_code == 2 and "--isoforms_set" in bad.stderr
    good = CliRunner().invoke(app, [*base, "--isoforms-set", "canonical"])
    assert good.exit_code == 0, good.stderr
    assert read_esm_file(tmp_path / "e.pt").emb.shape[0] == 2


def rows_by_protein(path: Path) -> dict[str, torch.Tensor]:
    data = read_esm_file(path)
    return dict(zip(data.protein_ids, data.emb, strict=True))


# -- the rules, on records -------------------------------------------------------------------
def iso(pid: str, length: int, canonical: bool = False) -> Isoform:
    return Isoform(pid, "T" + pid, "G", "M" * length, canonical, "protein_coding")


def test_canonical_only_picks_the_canonical_else_the_longest() -> None:
    gene = GeneIsoforms("Q", "G", "Q", (iso("P1", 50, True), iso("P2", 90)), "incomplete",
                        missing_protein_ids=("P3",), canonical_protein_id="P1")
    narrowed = canonical_only(gene)
    assert [i.protein_id for i in narrowed.isoforms] == ["P1"]
    assert narrowed.status == "ok" and narrowed.isoforms_set == "canonical"
    assert canonical_only(narrowed) is narrowed
    lost = GeneIsoforms("Q", "G", "Q", (iso("P2", 90),), "incomplete",
                        missing_protein_ids=("P1",), canonical_protein_id="P1")
    assert canonical_only(lost).isoforms == () and canonical_only(lost).canonical_missing
    unmarked = GeneIsoforms("Q", "G", "Q", (iso("P2", 90), iso("P4", 40)), "ok")
    assert [i.protein_id for i in canonical_only(unmarked).isoforms] == ["P2"]


def test_records_of_an_unfinished_run_as_each_set_sees_them() -> None:
    full = GeneIsoforms("A", "G", "A", (iso("P1", 50, True), iso("P2", 90)), "ok",
                        canonical_protein_id="P1")
    one = replace(canonical_only(full), query="B")
    assert set(records_for({"A": full, "B": one}, "all")) == {"A"}  # B: fetched again
    assert all(len(g.isoforms) == 1 for g in records_for({"A": full, "B": one},
                                                         "canonical").values())
    assert reusable_for(None, "canonical") is None
