"""End to end on CPU: fake Ensembl + tiny random ESM2 -> esm_all.pt, resume, extend."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from esm2_batch.embedding.embed import embed_sequences
from esm2_batch.errors import StoreError
from esm2_batch.models import LoadedModel
from esm2_batch.run.config import RunConfig
from esm2_batch.run.fasta_mode import run_fasta
from esm2_batch.run.gene_mode import partial_dir, run
from esm2_batch.run.stages import StageOptions
from esm2_batch.store.esm_file import read_esm_file
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.run.flat import make_config, with_flags
from tests.tolerance import stored_tolerance, tolerance

ROOT = Path(__file__).resolve().parents[2]
GENES = [braf(), *synthetic_genes(40, coding=3, nmd=1, noncoding_every=10)]
QUERIES = ["BRAF", "NOT_A_GENE", "GENE0010", "ENSG00900000003.2", *[f"GENE{i:04d}" for i in
                                                                  range(1, 9)], "BRAF"]


@pytest.fixture
def fake() -> Iterator[FakeEnsembl]:
    server = FakeEnsembl(GENES)
    with server.running_in_thread():
        yield server


def config_for(tmp_path: Path, fake: FakeEnsembl, queries: list[str], **kw: object) -> RunConfig:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(queries) + "\n")
    options: dict[str, object] = {"hvg_file": hvg, "out": tmp_path / "esm_all.pt",
                                  "ensembl_url": fake.url, "rate_limit": 1000.0,
                                  "progress": False, "toks_per_batch": 2048}
    return make_config(**{**options, **kw})


def test_output_follows_the_contract(tmp_path: Path, fake: FakeEnsembl,
                                     model: LoadedModel) -> None:
    summary = run(config_for(tmp_path, fake, QUERIES), model=model)
    data = torch.load(tmp_path / "esm_all.pt", weights_only=True)
    assert set(data) == {"emb", "genes", "protein_ids", "gene_to_isoform_indices", "meta"}
    # GENE0003 names the gene ENSG00900000003.2 already named: one gene, an alias
    genes = [q for q in QUERIES[:-1] if q != "GENE0003"]
    assert data["genes"] == genes and summary.duplicates == ["BRAF"]
    assert data["meta"]["aliases"] == {"GENE0003": "ENSG00900000003.2"}
    assert data["emb"].dtype == torch.float16 and data["emb"].shape[1] == 32
    assert data["emb"].shape[0] == len(data["protein_ids"]) == summary.isoforms
    index = data["gene_to_isoform_indices"]
    assert list(index) == genes
    assert index["NOT_A_GENE"] == [] and index["GENE0010"] == []  # not found, no protein
    assert data["meta"]["status"]["NOT_A_GENE"] == "not_found"
    assert data["meta"]["status"]["GENE0010"] == "no_protein"
    flat = [i for g in genes for i in index[g]]
    assert flat == list(range(len(flat)))  # gene by gene, in input order
    assert next(data["protein_ids"][i] for i in index["BRAF"]) == "ENSP00000493543"
    assert len(index["ENSG00900000003.2"]) == 3
    assert data["meta"]["gene_ids"]["ENSG00900000003.2"] == "ENSG00900000003"
    assert data["meta"]["ensembl_release"] == 114  # asked of the server (GET /info/data)
    assert summary.not_found == ["NOT_A_GENE"] and summary.no_protein == ["GENE0010"]
    assert (tmp_path / "esm_all.not_found.txt").read_text() == "NOT_A_GENE\n"
    assert not partial_dir(tmp_path / "esm_all.pt").exists()
    assert torch.isfinite(data["emb"].float()).all()


def test_rows_equal_embed_sequences(tmp_path: Path, fake: FakeEnsembl,
                                    model: LoadedModel) -> None:
    run(config_for(tmp_path, fake, QUERIES), model=model)
    esm = read_esm_file(tmp_path / "esm_all.pt")
    sequences = {t.protein_id: t.sequence for g in GENES for t in g.transcripts if t.protein_id}
    expected = embed_sequences(model, [sequences[p] for p in esm.protein_ids])
    # fp32 rows in other batches (FFN-width reductions in every layer), both stored as fp16
    limit = stored_tolerance(torch.float16, magnitude=float(expected.abs().max()),
                             terms=4 * model.embed_dim, depth=model.num_layers)
    assert (esm.emb.float() - expected.half().float()).abs().max() <= limit


def test_save_isoforms_then_run_offline_from_them(tmp_path: Path, fake: FakeEnsembl,
                                                  model: LoadedModel) -> None:
    fasta = tmp_path / "isoforms.fa"
    first = config_for(tmp_path, fake, QUERIES, save_isoforms=fasta)
    run(first, model=model)
    online = read_esm_file(first.out)
    offline = with_flags(first, out=tmp_path / "offline.pt", ensembl_url="http://127.0.0.1:9",
                      isoforms=fasta, save_isoforms=None)
    run(offline, model=model)
    again = read_esm_file(offline.out)
    assert again.protein_ids == online.protein_ids
    assert again.gene_to_isoform_indices == online.gene_to_isoform_indices
    assert torch.equal(again.emb, online.emb)


def test_extending_the_list_embeds_only_new_genes(tmp_path: Path, fake: FakeEnsembl,
                                                  model: LoadedModel) -> None:
    small = QUERIES[:6]
    run(config_for(tmp_path, fake, small), model=model)
    before = read_esm_file(tmp_path / "esm_all.pt")
    requests_before = fake.counts["requests"]
    fake.bodies.clear()
    longer = [*small, "GENE0021", "GENE0022"]
    summary = run(config_for(tmp_path, fake, longer), model=model)
    after = read_esm_file(tmp_path / "esm_all.pt")
    asked = {s for _, body in fake.bodies for s in body.get("symbols", [])}
    assert asked == {"GENE0021", "GENE0022"} and fake.counts["requests"] - requests_before == 2
    assert summary.embedded_now == 6 and summary.reused_rows == len(before.protein_ids)
    assert after.genes == longer
    n = len(before.protein_ids)
    assert torch.equal(after.emb[:n], before.emb) and after.protein_ids[:n] == before.protein_ids
    assert summary.not_found == ["NOT_A_GENE"]  # statuses survive reuse


def test_other_settings_are_refused_unless_overwrite(tmp_path: Path, fake: FakeEnsembl,
                                                     model: LoadedModel) -> None:
    config = config_for(tmp_path, fake, QUERIES[:3])
    run(config, model=model)
    before = (tmp_path / "esm_all.pt").read_bytes()
    with pytest.raises(StoreError, match=r"truncation: 1022 then, 500 now.*--overwrite"):
        run(with_flags(config, truncation=500), model=model)
    assert (tmp_path / "esm_all.pt").read_bytes() == before
    run(with_flags(config, truncation=500, overwrite=True), model=model)
    assert read_esm_file(tmp_path / "esm_all.pt").meta["truncation"] == 500


def test_an_unfinished_run_with_other_settings_is_refused(tmp_path: Path, fake: FakeEnsembl,
                                                          model: LoadedModel) -> None:
    from esm2_batch.run.gene_mode import run_settings
    from esm2_batch.store.partial import PartialStore

    config = config_for(tmp_path, fake, QUERIES[:3])
    other = run_settings(with_flags(config, long_seqs="window"), model)
    PartialStore(partial_dir(config.out), other)
    with pytest.raises(StoreError, match="unfinished run with other settings"):
        run(config, model=model)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "esm2_batch", *args]


def _single_threaded_env() -> dict[str, str]:
    """The CLI in a subprocess on one thread (torch takes its intra-op count from
    OMP_NUM_THREADS): on a 2-core machine a default thread pool only fights the test
    process and the fake server for the cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1"}


def test_fasta_mode_format_skipping_and_failures(tmp_path: Path, model: LoadedModel) -> None:
    good = tmp_path / "prots.fasta"
    good.write_text(">p1 first protein\nMKTAYIAKQR\nQISFVKSHFS\n>p2\nmkvl*\n>bad\nMKJX\n>p3\n"
                    "MKTAYIAKQRQISFVKSHFS\n")
    (tmp_path / "done.fa").write_text(">x\nMK\n")
    run_fasta([tmp_path / "done.fa"], model=model, stage=StageOptions(progress=False))
    done = (tmp_path / "done_ESM.pt").read_bytes()  # an earlier run's, same settings
    results = run_fasta([good, tmp_path / "done.fa"], model=model,
                        stage=StageOptions(progress=False))
    assert [r.skipped for r in results] == [False, True]
    assert (tmp_path / "done_ESM.pt").read_bytes() == done
    data = torch.load(tmp_path / "prots_ESM.pt", weights_only=True)
    assert data["proteins"] == ["p1", "p2", "p3"]
    assert all(t.dtype == torch.float32 and t.shape == (32,) for t in data["data"])
    assert torch.allclose(data["data"][0], data["data"][2])  # same sequence, same row
    expected = embed_sequences(model, ["MKVL"])[0]
    limit = tolerance(torch.float32, terms=4 * model.embed_dim, depth=model.num_layers)
    assert torch.allclose(data["data"][1], expected, atol=limit, rtol=0)
    log = (tmp_path / "extraction_failures.log").read_text().splitlines()
    assert len(log) == 1 and " | bad | " in log[0] and "'J'" in log[0]
    assert results[0].proteins == 3 and results[0].failed == 1
