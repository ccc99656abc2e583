"""The single-cell paths end to end: .h5ad in and out, offline Ensembl files equal to
REST, per-gene exports from the CLI, and the unresolved report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.models import LoadedModel, load_model
from esm2_batch.run.config import RunConfig
from esm2_batch.run.gene_mode import run
from esm2_batch.store.esm_file import read_esm_file
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.fakes.ensembl_files import write_ensembl_files
from tests.fakes.tiny_esm import write_tiny_checkpoint
from tests.run.flat import make_config, with_flags
from tests.tolerance import tolerance

GENES = [braf(), *synthetic_genes(12, coding=3, nmd=1, noncoding_every=5)]
QUERIES = ["BRAF", "GENE0001", "ENSG00900000002", "GENE0005", "RP11-34P13.7", "GENE0007"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("model"), num_layers=2,
                                 embed_dim=16)
    return load_model(path, device="cpu")


@pytest.fixture
def url() -> Iterator[str]:
    with FakeEnsembl(GENES).running_in_thread() as address:
        yield address


def base(tmp_path: Path, url: str, **kw: object) -> RunConfig:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(QUERIES) + "\n")
    options: dict[str, object] = {"hvg_file": hvg, "out": tmp_path / "esm_all.pt",
                                  "ensembl_url": url, "rate_limit": 1000.0,
                                  "progress": False}
    return make_config(**{**options, **kw})


def test_offline_files_give_the_same_file_as_rest(tmp_path: Path, url: str,
                                                  model: LoadedModel) -> None:
    rest = base(tmp_path, url)
    run(rest, model=model)
    files = write_ensembl_files(tmp_path / "release-110", GENES, release=110)
    offline = with_flags(rest, out=tmp_path / "offline.pt", ensembl_url="http://127.0.0.1:9",
                      ensembl_files=tmp_path / "release-110", ensembl_release=110)
    summary = run(offline, model=model)
    a, b = read_esm_file(rest.out), read_esm_file(offline.out)
    assert a.protein_ids == b.protein_ids and torch.equal(a.emb, b.emb)
    assert a.gene_to_isoform_indices == b.gene_to_isoform_indices
    assert a.meta["status"] == b.meta["status"]
    assert b.meta["ensembl_release"] == 110 and "ensembl-files" in b.meta["isoform_source"]
    assert any("Ensembl files" in note for note in summary.notes)
    del files


def test_unresolved_report_next_to_the_output(tmp_path: Path, url: str,
                                              model: LoadedModel) -> None:
    run(base(tmp_path, url), model=model)
    report = (tmp_path / "esm_all.unresolved.tsv").read_text().splitlines()
    rows = {line.split("\t")[0]: line for line in report[1:]}
    assert set(rows) == {"GENE0005", "RP11-34P13.7"}
    assert "clone" in rows["RP11-34P13.7"].lower()


def test_h5ad_in_and_out(tmp_path: Path, url: str, model: LoadedModel) -> None:
    var = pd.DataFrame({"gene_ids": ["ENSG00000157764", "ENSG00900000001", "ENSG00900000005",
                                     "ENSG00900000003", "ENSG00000000000"],
                        "highly_variable": [True, True, True, False, True]},
                       index=["BRAF", "GENE0001", "GENE0005", "GENE0003", "NOPE"])
    data = ad.AnnData(X=np.ones((3, 5), dtype=np.float32), var=var)
    source = tmp_path / "pbmc.h5ad"
    data.write_h5ad(source)
    config = base(tmp_path, url, hvg_file=source, write_h5ad=tmp_path / "pbmc.esm2.h5ad",
                  gene_pooling="mean")
    summary = run(config, model=model)
    assert any("gene_ids" in note for note in summary.notes)
    esm = read_esm_file(config.out)
    assert esm.genes == ["ENSG00000157764", "ENSG00900000001", "ENSG00900000005",
                         "ENSG00000000000"]
    assert esm.meta["symbols"]["ENSG00000157764"] == "BRAF"
    out = ad.read_h5ad(tmp_path / "pbmc.esm2.h5ad")
    vectors = np.asarray(out.varm["X_esm2"])
    assert vectors.shape == (5, 16) and vectors.dtype == np.float32
    braf_mean = esm.emb[esm.rows_of("ENSG00000157764")].float().mean(0).numpy()
    # the same fp16 rows (BRAF's isoforms) averaged in fp32, in another order
    braf_rows = esm.emb[esm.rows_of("ENSG00000157764")].float()
    limit = tolerance(torch.float32, terms=len(braf_rows), magnitude=float(braf_rows.abs().max()))
    assert np.allclose(vectors[0], braf_mean, atol=limit, rtol=0)
    assert not vectors[2].any() and not vectors[3].any()  # no protein; not in the HVGs
    # GENE0005: no protein (False); GENE0003: not an HVG, never looked up (<NA>);
    # NOPE: an HVG that Ensembl does not know (False)
    has = [None if pd.isna(v) else v for v in out.var["esm2_has_protein"].tolist()]
    assert has == [True, True, False, None, False]
    assert out.var["esm2_protein_id"].iloc[0] == "ENSP00000493543"
    assert out.uns["esm2"]["isoform_pooling"] == "mean"
    # provenance names what the run really read and wrote, not placeholders
    assert out.uns["esm2"]["esm_file"] == str(config.out)
    assert out.uns["esm2"]["id_column"] == "gene_ids"
    assert any("matched on gene_ids" in note for note in summary.notes)
    assert list(ad.read_h5ad(source).varm.keys()) == []  # the input is untouched


def test_cli_export_saturn_and_npz(tmp_path: Path, url: str, model: LoadedModel) -> None:
    config = base(tmp_path, url)
    run(config, model=model)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(config.out), "--format", "saturn",
                                 "--gene_pooling", "mean", "--out", str(tmp_path / "s.pt")])
    assert result.exit_code == 0, result.stderr
    saturn = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(saturn) == {"BRAF", "GENE0001", "GENE0002", "GENE0007"}  # ID -> its symbol
    esm = read_esm_file(config.out)
    assert torch.allclose(saturn["BRAF"], esm.emb[esm.rows_of("BRAF")].float().mean(0))
    result = runner.invoke(app, ["export", str(config.out), "--out", str(tmp_path / "g.npz")])
    assert result.exit_code == 0, result.stderr
    arrays = np.load(tmp_path / "g.npz")
    assert list(arrays["genes"]) == ["BRAF", "GENE0001", "ENSG00900000002", "GENE0007"]
    result = runner.invoke(app, ["export", str(config.out), "--out", str(tmp_path / "x"),
                                 "--format", "csv"])
    assert result.exit_code == 2 and "csv" in result.stderr


def test_write_h5ad_needs_an_h5ad_input(tmp_path: Path, url: str, model: LoadedModel) -> None:
    from esm2_batch.errors import InputError

    with pytest.raises(InputError, match=r"--write_h5ad needs an \.h5ad"):
        run(base(tmp_path, url, write_h5ad=tmp_path / "o.h5ad"), model=model)


def test_download_prints_the_urls() -> None:
    result = CliRunner().invoke(app, ["download", "--ensembl_release", "112", "--species",
                                      "mus_musculus", "--print_only", "--dir", "/tmp/x"])
    assert result.exit_code == 0, result.stderr
    assert ("release-112/fasta/mus_musculus/pep/Mus_musculus.GRCm39.pep.all.fa.gz"
            in result.stdout)
    assert "Mus_musculus.GRCm39.112.canonical.tsv.gz" in result.stdout
