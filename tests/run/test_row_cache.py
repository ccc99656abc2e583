"""The row cache across runs (issue: a lab that embeds ten HVG lists of 2,000 genes embeds
their union once): another gene list, another --out or a FASTA file reuses every row it
holds, exactly; --no_cache neither reads nor writes it; `cache info` / `cache prune`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.models import LoadedModel
from esm2_batch.run.fasta_mode import run_fasta
from esm2_batch.run.gene_mode import run
from esm2_batch.run.reports import RunSummary
from esm2_batch.run.stages import StageOptions
from esm2_batch.store.cache import DB_FILE
from esm2_batch.store.esm_file import read_esm_file
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes

GENES = [braf(), *synthetic_genes(6, coding=2, nmd=0)]
runner = CliRunner()


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with FakeEnsembl(GENES).running_in_thread() as address:
        yield address


def gene_run(tmp_path: Path, url: str, model: LoadedModel, queries: list[str], out: str,
             **stage: object) -> RunSummary:
    from tests.run.flat import make_config

    hvg = tmp_path / f"{out}.txt"
    hvg.write_text("\n".join(queries) + "\n")
    config = make_config(hvg_file=hvg, out=tmp_path / out, ensembl_url=url,
                         rate_limit=1000.0, progress=False, **stage)
    return run(config, model=model)


def rows_by_protein(path: Path) -> dict[str, torch.Tensor]:
    data = read_esm_file(path)
    return dict(zip(data.protein_ids, data.emb, strict=True))


def test_another_list_in_another_project_embeds_only_its_new_sequences(
        tmp_path: Path, url: str, model: LoadedModel) -> None:
    first = gene_run(tmp_path, url, model, ["BRAF", "GENE0001", "GENE0002"], "a.pt")
    second = gene_run(tmp_path, url, model, ["GENE0002", "BRAF", "GENE0003"], "b.pt")
    assert first.cached_rows == 0 and first.embedded_now == first.distinct_sequences
    only_new = gene_run(tmp_path, url, model, ["GENE0003"], "c.pt", cache=False)
    assert second.embedded_now == only_new.distinct_sequences > 0  # GENE0003's only
    assert second.cached_rows == second.distinct_sequences - only_new.distinct_sequences
    old, now = rows_by_protein(tmp_path / "a.pt"), rows_by_protein(tmp_path / "b.pt")
    shared = set(old) & set(now)
    assert shared and all(torch.equal(old[p], now[p]) for p in shared)
    assert any("from the row cache" in line for line in second.lines())
    engines = (read_esm_file(tmp_path / "a.pt").meta["engine"],
               read_esm_file(tmp_path / "b.pt").meta["engine"])
    assert engines == (model.engine, f"{model.engine}+row-cache")  # meta says where rows came from


def test_no_cache_neither_reads_nor_writes(tmp_path: Path, url: str, model: LoadedModel,
                                           own_row_cache: Path) -> None:
    gene_run(tmp_path, url, model, ["BRAF"], "a.pt", cache=False)
    assert not (own_row_cache / DB_FILE).exists()
    gene_run(tmp_path, url, model, ["BRAF"], "b.pt")
    again = gene_run(tmp_path, url, model, ["BRAF"], "c.pt", cache=False)
    assert again.cached_rows == 0 and again.embedded_now == again.distinct_sequences


def test_fasta_mode_reuses_gene_mode_rows_in_float32(tmp_path: Path, url: str,
                                                     model: LoadedModel) -> None:
    """Gene mode stores float16, the cache float32: FASTA mode's float32 file gets the
    exact rows a fresh computation of the same batches gives, not float16-rounded ones."""
    gene_run(tmp_path, url, model, ["BRAF"], "a.pt")
    sequences = [t.sequence for t in braf().transcripts
                 if t.sequence and t.biotype == "protein_coding"]
    fasta = tmp_path / "braf.fa"
    fasta.write_text("".join(f">p{n}\n{s}\n" for n, s in enumerate(sequences)))
    (cached,) = run_fasta([fasta], model=model, stage=StageOptions(progress=False))
    assert cached.cached == len(set(sequences)) and cached.proteins == len(sequences)
    from_cache = torch.load(cached.out, weights_only=True)["data"]
    (fresh,) = run_fasta([fasta], model=model, overwrite=True, out_dir=_dir(tmp_path),
                         stage=StageOptions(progress=False, cache=False))
    computed = torch.load(fresh.out, weights_only=True)["data"]
    assert fresh.cached == 0 and from_cache[0].dtype == torch.float32
    gene_rows = rows_by_protein(tmp_path / "a.pt")
    assert any(not torch.equal(r, r.half().float()) for r in from_cache)  # not fp16 rows
    for row in from_cache:
        assert any(torch.equal(row.half(), g) for g in gene_rows.values())
    assert len(computed) == len(from_cache)


def _dir(tmp_path: Path) -> Path:
    path = tmp_path / "fresh"
    path.mkdir()
    return path


def test_cache_commands(tmp_path: Path, url: str, model: LoadedModel,
                        own_row_cache: Path) -> None:
    summary = gene_run(tmp_path, url, model, ["BRAF", "GENE0001"], "a.pt")
    result = runner.invoke(app, ["cache", "info"])
    assert result.exit_code == 0, result.stderr
    assert f"{summary.distinct_sequences} rows in 1 settings" in result.stdout
    assert model.fingerprint[:12] in result.stdout and "layer 2 mean" in result.stdout
    result = runner.invoke(app, ["cache", "prune"])
    assert result.exit_code == 2 and "--older_than" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["cache", "prune", "--max_size", "lots"])
    assert result.exit_code == 2 and "20G" in result.stderr
    result = runner.invoke(app, ["cache", "prune", "--cache-dir", str(own_row_cache),
                                 "--max_size", "0"])
    assert result.exit_code == 0, result.stderr
    assert f"deleted {summary.distinct_sequences} rows; 0 left" in result.stdout


def test_a_cache_dir_that_cannot_be_used_is_one_line_before_any_work(
        tmp_path: Path, url: str, checkpoint: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("BRAF\n")
    result = runner.invoke(app, ["--hvg_file", str(hvg), "--model_path", str(checkpoint),
                                 "--ensembl_url", url, "--out", str(tmp_path / "o.pt"),
                                 "--device", "cpu", "--cache_dir", str(blocker), "-q"])
    assert result.exit_code == 6, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cache_dir" in lines[0] and "--no_cache" in lines[0]
    assert not (tmp_path / "o.pt").exists()
