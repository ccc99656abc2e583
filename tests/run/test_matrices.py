"""Several layers and poolers in gene mode and FASTA mode: emb unchanged, further
matrices under documented keys, every matrix of a row resumed together, and rows of other
layers/poolers never reused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.cli_flags import join_list_flags
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.errors import InputError, StoreError
from esm2_batch.models import LoadedModel
from esm2_batch.nn import load_esm_matrix
from esm2_batch.outputs.export import export_genes
from esm2_batch.run.config import RunConfig
from esm2_batch.run.fasta_mode import run_fasta
from esm2_batch.run.gene_mode import partial_dir, run, run_settings
from esm2_batch.store.esm_file import read_esm_file
from esm2_batch.store.keys import RowKeys, settings_scope
from esm2_batch.store.partial import PartialStore
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.run.flat import make_config, with_flags

GENES = [braf(), *synthetic_genes(3, coding=2, nmd=0)]
QUERIES = ["BRAF", *(g.symbol for g in GENES[1:])]
MULTI = {"repr_layers": (1, -1), "include": ("mean", "max")}  # the conftest model: 2 layers
KEYS = ["emb", "emb_max_layer1", "emb_mean_layer2", "emb_max_layer2"]


@pytest.fixture
def url() -> Iterator[str]:
    with FakeEnsembl(GENES).running_in_thread() as address:
        yield address


def config_for(tmp_path: Path, url: str, out: str = "esm_all.pt", **flags: object
               ) -> RunConfig:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(QUERIES) + "\n")
    return make_config(hvg_file=hvg, out=tmp_path / out, ensembl_url=url, rate_limit=1000.0,
                       progress=False, **flags)


def test_gene_mode_writes_every_matrix_and_emb_stays(tmp_path: Path, url: str,
                                                     model: LoadedModel) -> None:
    multi = config_for(tmp_path, url, **MULTI)
    run(multi, model=model)
    run(config_for(tmp_path, url, "layer1.pt", repr_layer=1), model=model)
    run(config_for(tmp_path, url, "last.pt"), model=model)
    data = torch.load(multi.out, weights_only=True)
    assert [k for k in data if k.startswith("emb")] == KEYS
    assert all(data[k].dtype == torch.float16 and data[k].shape == data["emb"].shape
               for k in KEYS)
    assert list(data["meta"]["matrices"]) == KEYS
    assert data["meta"]["matrices"]["emb_max_layer2"] == {"pooler": "max", "layer": 2}
    assert data["meta"]["layer"] == 1 and data["meta"]["pooling"] == "mean"
    assert torch.equal(data["emb"], read_esm_file(tmp_path / "layer1.pt").emb)
    assert torch.equal(data["emb_mean_layer2"], read_esm_file(tmp_path / "last.pt").emb)
    assert not torch.equal(data["emb_max_layer2"], data["emb_mean_layer2"])
    matrix, _ = load_esm_matrix(multi.out, QUERIES, key="emb_max_layer2")
    canonical = [data["gene_to_isoform_indices"][q][0] for q in QUERIES]
    assert torch.equal(matrix, data["emb_max_layer2"][canonical].float())
    with pytest.raises(StoreError, match="emb_max_layer2"):
        load_esm_matrix(multi.out, QUERIES, key="emb_std_layer2")
    export_genes(multi.out, out=tmp_path / "max.npz", key="emb_max_layer2",
                 include_missing=True)
    saved = np.load(tmp_path / "max.npz")
    assert np.array_equal(saved["vectors"], matrix.numpy())


def poison_store(config: RunConfig, model: LoadedModel, sequences: list[str],
                 width: int) -> None:
    settings = run_settings(config, model)
    keys = RowKeys(settings_scope(settings))
    rows = torch.arange(width, dtype=torch.float32).repeat(len(sequences), 1)
    with PartialStore(partial_dir(config.out), settings) as store:
        store.add_rows([keys.of(s) for s in sequences], rows)


def braf_sequences() -> list[str]:
    return [t.sequence for t in braf().transcripts
            if t.sequence and t.biotype == "protein_coding"]


def test_resume_reads_every_matrix_of_a_row(tmp_path: Path, url: str,
                                            model: LoadedModel) -> None:
    config = config_for(tmp_path, url, **MULTI)
    dim = model.embed_dim
    poison_store(config, model, braf_sequences(), 4 * dim)  # as an interrupted run left it
    run(config, model=model)
    data = read_esm_file(config.out)
    braf_rows = data.rows_of("BRAF")
    for n, key in enumerate(KEYS):
        want = torch.arange(n * dim, (n + 1) * dim, dtype=torch.float16)
        assert all(torch.equal(data.matrix(key)[i], want) for i in braf_rows), key


def test_other_layers_or_poolers_never_reuse_rows(tmp_path: Path, url: str,
                                                  model: LoadedModel) -> None:
    config = config_for(tmp_path, url, **MULTI)
    poison_store(config, model, braf_sequences(), 4 * model.embed_dim)
    other = with_flags(config, include=("mean", "std"))
    assert run_settings(other, model) != run_settings(config, model)
    with pytest.raises(StoreError, match="other settings"):
        run(other, model=model)
    (partial_dir(config.out) / "settings.json").unlink()  # nothing proves their settings
    run(other, model=model)
    data = read_esm_file(config.out)
    assert list(data.matrices) == ["emb_std_layer1", "emb_mean_layer2", "emb_std_layer2"]
    poisoned = torch.arange(model.embed_dim, dtype=torch.float16)
    assert not any(torch.equal(data.emb[i], poisoned) for i in data.rows_of("BRAF"))


def test_gene_mode_refuses_a_layer_beyond_the_depth(tmp_path: Path, url: str,
                                                    model: LoadedModel) -> None:
    with pytest.raises(InputError, match="beyond"):
        run(config_for(tmp_path, url, repr_layers=(1, 5)), model=model)
    assert not partial_dir(tmp_path / "esm_all.pt").exists()


def test_fasta_mode_keys(tmp_path: Path, model: LoadedModel) -> None:
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a x\nMKVLAAGIVG\n>b\nMSTNPKPQRK\n>c\nM\n")
    (tmp_path / "multi").mkdir()
    (tmp_path / "one").mkdir()
    run_fasta([fasta], model=model, out_dir=tmp_path / "multi",
              embed=EmbedOptions(repr_layers=(0, 2), include=("bos", "std")))
    run_fasta([fasta], model=model, out_dir=tmp_path / "one",
              embed=EmbedOptions(repr_layer=0, pooling="bos"))
    multi = torch.load(tmp_path / "multi" / "in_ESM.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "in_ESM.pt", weights_only=True)
    assert set(one) == {"proteins", "data", "meta"}  # one matrix: no 'matrices' key
    assert list(multi) == ["proteins", "data", "data_std_layer0", "data_bos_layer2",
                           "data_std_layer2", "matrices", "meta"]
    assert multi["matrices"]["data"] == {"pooler": "bos", "layer": 0}
    assert multi["proteins"] == ["a", "b", "c"]
    assert all(torch.equal(x, y) for x, y in zip(multi["data"], one["data"], strict=True))
    assert all(r.dtype == torch.float32 and r.shape == (model.embed_dim,)
               for k in ("data_std_layer0", "data_std_layer2") for r in multi[k])


def test_cli_takes_esm_extract_lists(tmp_path: Path, checkpoint: Path) -> None:
    assert join_list_flags(["--repr_layers", "1", "-1", "--include", "mean", "max", "x.fa"]
                           ) == ["--repr_layers", "1,-1", "--include", "mean,max", "x.fa"]
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nMKVLAAGIVG\n")
    runner = CliRunner()
    done = runner.invoke(app, ["fasta", str(fasta), "--model_path", str(checkpoint),
                               "--device", "cpu", "--repr_layers", "1", "-1", "--include",
                               "mean", "max", "-q"])
    assert done.exit_code == 0, done.output
    data = torch.load(tmp_path / "in_ESM.pt", weights_only=True)
    assert list(data["matrices"]) == ["data", "data_max_layer1", "data_mean_layer2",
                                      "data_max_layer2"]
    bad = runner.invoke(app, ["fasta", str(fasta), "--model_path", str(checkpoint),
                              "--device", "cpu", "--overwrite", "--repr_layers", "7"])
    assert bad.exit_code == 2 and "beyond" in bad.output
    bad = runner.invoke(app, ["fasta", str(fasta), "--model_path", str(checkpoint),
                              "--include", "median"])
    assert bad.exit_code == 2 and "median" in bad.output
