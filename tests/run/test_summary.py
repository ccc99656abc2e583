"""The run summary: counts that add up, every side file named, and where each of the
file's distinct sequences came from (embedded now, the row cache, an unfinished run's
partial store, the existing esm_all.pt), also on a rerun and after a crash."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from esm2_batch.models import LoadedModel
from esm2_batch.records import GeneIsoforms, Isoform
from esm2_batch.run import gene_mode
from esm2_batch.run.config import RunConfig
from esm2_batch.run.gene_mode import partial_dir, run
from esm2_batch.run.reports import RunSummary
from esm2_batch.store.esm_file import read_esm_file, validate
from esm2_batch.store.keys import RowKeys
from tests.fakes.ensembl import FakeEnsembl, FakeGene, FakeTranscript, braf, synthetic_genes
from tests.run.flat import with_flags
from tests.run.test_resume_facts import config_for as resume_config
from tests.test_cli import invoke


def twin(gene: FakeGene, symbol: str, number: int) -> FakeGene:
    """Another gene whose proteins have `gene`'s sequences (as histone or amylase copies
    do): its rows are the same sequences, embedded once."""
    transcripts = [FakeTranscript(f"ENST{800000000 + number * 100 + k:011d}", t.biotype,
                                  t.is_canonical,
                                  f"ENSP{800000000 + number * 100 + k:011d}" if t.protein_id
                                  else None, t.sequence)
                   for k, t in enumerate(gene.transcripts)]
    return FakeGene(f"ENSG{800000000 + number:011d}", symbol, transcripts)


SYNTHETIC = synthetic_genes(12, coding=2, nmd=0, noncoding_every=10)
GENES = [braf(), *SYNTHETIC, twin(SYNTHETIC[0], "TWIN1", 1)]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeEnsembl]:
    server = FakeEnsembl(GENES)
    with server.running_in_thread():
        yield server


def config_for(tmp_path: Path, fake: FakeEnsembl, queries: list[str]) -> RunConfig:
    """test_resume_facts' config, without the row cache (its hits would hide the counts
    under test)."""
    return with_flags(resume_config(tmp_path, fake, queries), cache=False)


def sequences_line(summary: RunSummary) -> str:
    return next(line for line in summary.lines() if line.startswith("isoforms: "))


def assert_sequences_add_up(summary: RunSummary) -> None:
    line = sequences_line(summary)
    numbers = [int(n) for n in re.findall(r"(\d+) (?:embedded|from|resumed|reused)", line)]
    assert len(numbers) == 4 and sum(numbers) == summary.distinct_sequences, line
    assert f"distinct sequences: {summary.distinct_sequences} (" in line


def distinct_rows(path: Path) -> int:
    return len({tuple(row.tolist()) for row in read_esm_file(path).emb})


# -- on the summary itself ---------------------------------------------------------------------
def test_gene_counts_add_up_and_say_what_each_means() -> None:
    summary = RunSummary(out=Path("out/esm_all.pt"), genes_in=10, duplicates=["BRAF"],
                         aliases={"braf": "BRAF"}, complete=5, incomplete=["GENE0001"],
                         no_protein=["MALAT1", "NEAT1"], not_found=["NOPE"])
    lines = summary.lines()
    assert "genes in: 10 distinct (1 duplicates dropped)" in lines
    assert summary.resolved == 8  # the genes without a protein were resolved too
    assert ("resolved: 8 of 9 genes (5 with a row for every isoform, 1 incomplete, 2 "
            "without protein: no vector), not found: 1") in lines  # 9 = 10 - 1 merged


def test_side_files_are_named_with_what_they_hold(tmp_path: Path) -> None:
    out = tmp_path / "esm_all.pt"
    summary = RunSummary(out=out, side_files=[tmp_path / "esm_all.unresolved.tsv",
                                              tmp_path / "esm_all.failed.tsv"])
    lines = summary.lines()
    assert ("wrote esm_all.unresolved.tsv: every gene without a full vector, with its "
            "likely reason") in lines
    assert any(line.startswith("wrote esm_all.failed.tsv: ") for line in lines)
    assert not any("not_found" in line for line in lines)


@dataclass
class Stage:
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    embedded: int = 0
    cached: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    budgets: dict[str, int] = field(default_factory=dict)


def _gene(query: str, *sequences: str) -> GeneIsoforms:
    isoforms = tuple(Isoform(f"ENSP_{query}_{k}", f"ENST_{query}_{k}", f"ENSG_{query}", s,
                             k == 0, "protein_coding") for k, s in enumerate(sequences))
    return GeneIsoforms(query, f"ENSG_{query}", query, isoforms, "ok")


def test_sequences_embedded_cached_resumed_and_reused_add_up(tmp_path: Path) -> None:
    keys = RowKeys("scope")
    chosen = {"A": _gene("A", "MKV", "MKVL"), "B": _gene("B", "MKV", "MQQ", "MRR")}
    rows = {"MKV": 1.0, "MKVL": 2.0, "MQQ": 3.0, "MRR": 4.0}
    emb = torch.tensor([[1.0], [2.0], [1.0], [3.0], [4.0], [5.0], [5.0], [1.0]],
                       dtype=torch.float16)  # A, B, then C (one sequence twice) and D
    written = validate({"emb": emb, "genes": ["A", "B", "C", "D"],
                        "protein_ids": [f"P{i}" for i in range(8)],
                        "gene_to_isoform_indices": {"A": [0, 1], "B": [2, 3, 4],
                                                    "C": [5, 6], "D": [7]}, "meta": {}})
    assert [rows[i.sequence] for g in chosen.values() for i in g.isoforms] == emb[:5, 0].tolist()
    summary = RunSummary(out=tmp_path / "esm_all.pt")
    summary.count(["A", "B", "C", "D"], chosen, None, Stage(embedded=2, cached=1), keys=keys,
                  resumable={keys.of("MRR"), keys.of("OTHER")})  # OTHER: not this run's
    summary.count_file(written, chosen)
    assert summary.fresh_sequences == 4 and summary.resumed_rows == 1
    assert summary.reused_sequences == 1  # C's one sequence; D's row is one of A's
    assert summary.distinct_sequences == 5 and summary.isoforms == 8
    assert sequences_line(summary) == (
        "isoforms: 8, distinct sequences: 5 (2 embedded now, 1 from the row cache, "
        "1 resumed from the unfinished run, 1 reused from the existing esm_all.pt)")


# -- through gene mode -------------------------------------------------------------------------
def test_a_rerun_counts_the_files_sequences_as_reused(tmp_path: Path, fake: FakeEnsembl,
                                                       model: LoadedModel) -> None:
    config = config_for(tmp_path, fake, ["BRAF", "GENE0001", "TWIN1", "braf", "GENE0002"])
    first = run(config, model=model)
    assert first.distinct_sequences == first.embedded_now == distinct_rows(config.out)
    assert first.isoforms > first.distinct_sequences  # TWIN1 shares GENE0001's sequences
    assert first.aliases == {"braf": "BRAF"}
    assert_sequences_add_up(first)
    fake.bodies.clear()
    again = run(config, model=model)
    assert again.distinct_sequences == first.distinct_sequences  # was 0
    assert again.reused_sequences == first.distinct_sequences
    assert again.embedded_now == 0 and fake.bodies == []  # braf is still BRAF: not fetched
    assert again.aliases == {"braf": "BRAF"}
    assert read_esm_file(config.out).meta["aliases"] == {"braf": "BRAF"}
    assert_sequences_add_up(again)
    longer = run(config_for(tmp_path, fake, ["BRAF", "GENE0001", "TWIN1", "braf", "GENE0002",
                                             "GENE0003"]), model=model)
    assert longer.embedded_now == 2 and longer.reused_sequences == first.distinct_sequences
    assert longer.distinct_sequences == distinct_rows(config.out)
    assert_sequences_add_up(longer)


def test_rows_resumed_from_the_partial_store_are_counted(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows an interrupted attempt stored are neither embedded again nor left out of the
    count (it said "490 embedded now, 0 from the cache, 0 reused" for 500 sequences)."""
    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # after every row was stored, before esm_all.pt

    first = config_for(tmp_path, fake, ["BRAF", "GENE0001"])
    with monkeypatch.context() as patch:
        patch.setattr(gene_mode, "write_esm_file", crash)
        with pytest.raises(KeyboardInterrupt):
            run(first, model=model)
    assert partial_dir(first.out).is_dir()
    summary = run(config_for(tmp_path, fake, ["BRAF", "GENE0001", "GENE0003"]), model=model)
    assert summary.embedded_now == 2  # GENE0003's two isoforms only
    assert summary.resumed_rows == summary.distinct_sequences - 2 > 0
    assert_sequences_add_up(summary)
    assert "2 embedded now" in sequences_line(summary)


def test_genes_without_protein_are_resolved_and_the_report_is_named(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel) -> None:
    config = config_for(tmp_path, fake, ["BRAF", "GENE0010", "NOT_A_GENE", "GENE0001"])
    summary = run(config, model=model)
    assert summary.resolved == 3 and summary.no_protein == ["GENE0010"]
    assert ("resolved: 3 of 4 genes (2 with a row for every isoform, 1 without "
            "protein: no vector), not found: 1") in summary.lines()
    assert (tmp_path / "esm_all.unresolved.tsv").is_file()
    assert summary.side_files == [tmp_path / "esm_all.unresolved.tsv",
                                  tmp_path / "esm_all.not_found.txt"]
    assert any(line.startswith("wrote esm_all.unresolved.tsv: ") for line in summary.lines())


# -- through the CLI ---------------------------------------------------------------------------
def test_the_cli_summary_adds_up_on_a_first_run_and_a_rerun(
        tmp_path: Path, fake: FakeEnsembl, checkpoint: Path) -> None:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("BRAF\nGENE0010\nGENE0001\nBRAF\nNOPE\n")
    args = ["--hvg_file", str(hvg), "--out", str(tmp_path / "e.pt"), "--model_path",
            str(checkpoint), "--ensembl_url", fake.url, "--rate_limit", "100", "--no_cache"]
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    assert "genes in: 4 distinct (1 duplicates dropped)" in stdout
    assert ("resolved: 3 of 4 genes (2 with a row for every isoform, 1 without "
            "protein: no vector), not found: 1") in stdout
    assert "wrote e.unresolved.tsv: every gene without a full vector" in stdout
    distinct = distinct_rows(tmp_path / "e.pt")
    assert (f"distinct sequences: {distinct} ({distinct} embedded now, 0 from the row "
            "cache, 0 resumed from the unfinished run, 0 reused") in stdout
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    assert (f"distinct sequences: {distinct} (0 embedded now, 0 from the row cache, 0 "
            f"resumed from the unfinished run, {distinct} reused from the existing e.pt)"
            ) in stdout


@pytest.mark.parametrize("later", [["braf", "GENE0001"], ["braf", "BRAF"]])
def test_a_spelling_merged_last_time_is_fetched_when_its_gene_is_not_first(
        tmp_path: Path, fake: FakeEnsembl, model: LoadedModel, later: list[str]) -> None:
    """braf was merged into BRAF; a list without BRAF before it fetches braf as a gene of
    its own (its rows are its own, never an empty "ok" gene)."""
    run(config_for(tmp_path, fake, ["BRAF", "braf"]), model=model)
    summary = run(config_for(tmp_path, fake, later), model=model)
    data = read_esm_file(tmp_path / "esm_all.pt")
    assert data.genes[0] == "braf" and len(data.rows_of("braf")) == 5
    assert data.meta["status"]["braf"] == "ok"
    assert summary.aliases == ({"BRAF": "braf"} if "BRAF" in later else {})
    assert_sequences_add_up(summary)
