"""--all_genes: every protein-coding gene of the offline Ensembl files, through the CLI,
its one-line errors, a resume after a crash, and the bounded-memory pieces it relies on
(batched isoform log, assembly from one rows chunk at a time)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.models import LoadedModel
from esm2_batch.records import GeneIsoforms
from esm2_batch.run.config import RunConfig
from esm2_batch.run.gene_mode import partial_dir, run
from esm2_batch.sources.ensembl_files import EnsemblFilesSource
from esm2_batch.store.esm_file import assemble, read_esm_file
from esm2_batch.store.keys import RowKeys
from esm2_batch.store.partial import GeneLog, PartialStore
from tests.fakes.ensembl import FakeGene, synthetic_genes
from tests.fakes.ensembl_files import patch_copy, write_ensembl_files
from tests.run.flat import make_config

runner = CliRunner()
# GENE0004 and GENE0008 have no translation; each other gene 2 coding + 1 NMD isoform
GENES = synthetic_genes(9, coding=2, nmd=1, noncoding_every=4)
PATCH = patch_copy(GENES[0])  # GENE0001 again on a CHR_ patch, under another gene ID


Stream = Callable[[EnsemblFilesSource, Sequence[str]], AsyncIterator[GeneIsoforms]]


def coding(genes: Sequence[FakeGene]) -> list[str]:
    return sorted(g.gene_id for g in genes if any(t.protein_id for t in g.transcripts))


@pytest.fixture
def files(tmp_path: Path) -> Path:
    directory = tmp_path / "ensembl"
    write_ensembl_files(directory, GENES, patches=[PATCH])
    return directory


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stderr


def one_line_error(code: int, stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("esm2-batch: error: ") and "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_embeds_every_coding_gene_canonical_first(tmp_path: Path, files: Path,
                                                      checkpoint: Path) -> None:
    out = tmp_path / "esm_all.pt"
    code, stderr = invoke("--all_genes", "--ensembl_files", str(files), "--model_path",
                          str(checkpoint), "--device", "cpu", "--out", str(out), "-q")
    assert code == 0, stderr
    data = torch.load(out, weights_only=True)
    assert data["genes"] == coding(GENES)  # no patch-only gene, no non-coding gene
    assert PATCH.gene_id not in data["genes"] and len(data["genes"]) == 7
    by_id = {g.gene_id: g for g in GENES}
    for gene, rows in data["gene_to_isoform_indices"].items():
        canonical = next(t for t in by_id[gene].transcripts if t.is_canonical)
        assert len(rows) == 2  # protein_coding only: the NMD isoform is not wanted
        assert data["protein_ids"][rows[0]] == canonical.protein_id
    assert data["emb"].shape == (14, 32) and data["emb"].dtype == torch.float16
    assert not partial_dir(out).exists()


def test_all_genes_with_a_gene_list_is_one_line(tmp_path: Path, files: Path) -> None:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("GENE0001\n")
    code, stderr = invoke("--all_genes", "--hvg_file", str(hvg), "--ensembl_files",
                          str(files), "--model_size", "8M", "--out", str(tmp_path / "e.pt"))
    one_line_error(code, stderr, "--all_genes", "--hvg_file")


def test_all_genes_over_rest_names_the_offline_files(tmp_path: Path) -> None:
    code, stderr = invoke("--all_genes", "--model_size", "8M", "--ensembl_url",
                          "http://127.0.0.1:9", "--out", str(tmp_path / "e.pt"))
    one_line_error(code, stderr, "--ensembl_files DIR", "--ensembl_release N",
                   "esm2-batch download")
    assert not partial_dir(tmp_path / "e.pt").exists()  # refused before anything ran


def all_genes_config(directory: Path, files: Path) -> RunConfig:
    config = make_config(out=directory / "esm_all.pt", ensembl_files=files, progress=False,
                         toks_per_batch=2048)
    return dataclasses.replace(config, all_genes=True)


def test_a_crashed_run_resumes_with_the_genes_left(tmp_path: Path, files: Path,
                                                   model: LoadedModel,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = all_genes_config(tmp_path / "resumed", files)
    original = EnsemblFilesSource.stream
    asked: list[list[str]] = []

    def crashing(after: int | None) -> Stream:
        async def stream(self: EnsemblFilesSource, queries: Sequence[str]
                         ) -> AsyncIterator[GeneIsoforms]:
            asked.append(list(queries))
            n = 0
            async for gene in original(self, queries):
                if after is not None and n == after:
                    raise OSError("crash mid-fetch")
                n += 1
                yield gene
        return stream

    monkeypatch.setattr(EnsemblFilesSource, "stream", crashing(3))
    (config.out.parent).mkdir()
    with pytest.raises(OSError, match="crash mid-fetch"):
        run(config, model=model)
    assert partial_dir(config.out).is_dir() and not config.out.exists()
    monkeypatch.setattr(EnsemblFilesSource, "stream", crashing(None))
    run(config, model=model)
    assert asked[1] == coding(GENES)[3:]  # the three recorded genes are not read again

    straight = all_genes_config(tmp_path / "straight", files)
    straight.out.parent.mkdir()
    run(straight, model=model)
    resumed, once = read_esm_file(config.out), read_esm_file(straight.out)
    assert resumed.genes == once.genes and resumed.protein_ids == once.protein_ids
    assert torch.equal(resumed.emb, once.emb)


def gene(query: str, sequence: str) -> GeneIsoforms:
    return GeneIsoforms.from_dict({
        "query": query, "gene_id": f"ENSG_{query}", "symbol": query, "status": "ok",
        "isoforms": [{"protein_id": f"P_{query}", "transcript_id": f"T_{query}",
                      "gene_id": f"ENSG_{query}", "sequence": sequence,
                      "is_canonical": True, "biotype": "protein_coding"}]})


def test_gene_log_records_a_batch_only_once_fsynced(tmp_path: Path) -> None:
    with PartialStore(tmp_path / "p", {"embed_dim": 2}) as store:
        log = GeneLog(store, batch=3, seconds=3600)
        log.add(gene("A", "MK"))
        log.add(gene("B", "MV"))
        assert store.cached_genes() == {}  # buffered: a kill -9 now re-reads A and B
        log.add(gene("C", "ML"))
        assert sorted(store.cached_genes()) == ["A", "B", "C"]
        log.add(gene("D", "MW"))
        log.flush()
        assert sorted(store.cached_genes()) == ["A", "B", "C", "D"]


def test_assembly_from_chunks_equals_assembly_from_a_mapping(tmp_path: Path) -> None:
    keys = RowKeys("scope")
    records = {q: gene(q, s) for q, s in [("A", "MK"), ("B", "MV"), ("C", "MK")]}
    with PartialStore(tmp_path / "p", {"embed_dim": 2, "matrices": ["x", "y"]}) as store:
        store.add_rows([keys.of("MK")], torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        store.add_rows([keys.of("MV"), keys.of("MK")],
                       torch.tensor([[5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]]))
        from_chunks = assemble(["A", "B", "C"], records, store.row_chunks(), keys=keys,
                               dim=2, meta={}, matrices=["emb", "emb_max_layer1"])
        from_mapping = assemble(["A", "B", "C"], records, store.load_rows(), keys=keys,
                                dim=2, meta={}, matrices=["emb", "emb_max_layer1"])
    for key in ("emb", "emb_max_layer1"):
        assert torch.equal(from_chunks[key], from_mapping[key])
        assert from_chunks[key].dtype == torch.float16
    assert from_chunks["emb"].tolist() == [[9, 10], [5, 6], [9, 10]]  # a later chunk wins
    assert from_chunks["emb_max_layer1"][1].tolist() == [7, 8]
