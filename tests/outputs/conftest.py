"""A small gene-mode run shared by the tests that look at its outputs (inspect, report)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from esm2_batch.models import LoadedModel, load_model
from esm2_batch.run.gene_mode import run
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.fakes.tiny_esm import write_tiny_checkpoint
from tests.run.flat import make_config

GENES = [braf(), *synthetic_genes(12, coding=3, nmd=1, noncoding_every=5)]
QUERIES = ["BRAF", "GENE0001", "ENSG00900000002", "GENE0005", "RP11-34P13.7", "GENE0007",
           "GENE0003"]


@pytest.fixture(scope="session")
def made_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("model"), num_layers=2,
                                 embed_dim=16)
    return load_model(path, device="cpu")


@pytest.fixture(scope="session")
def made(tmp_path_factory: pytest.TempPathFactory, made_model: LoadedModel) -> Iterator[Path]:
    """One gene-mode run (a per_tok store, two matrices, proteins cut at 500), shared by
    the session; without the row cache, since a session fixture is set up before the
    per-test one that points the cache at a temporary directory."""
    directory = tmp_path_factory.mktemp("run")
    hvg = directory / "hvg.txt"
    hvg.write_text("\n".join(QUERIES) + "\n")
    with FakeEnsembl(GENES).running_in_thread() as url:
        run(make_config(hvg_file=hvg, out=directory / "esm_all.pt", ensembl_url=url,
                        rate_limit=1000.0, progress=False, truncation=500,
                        include=("mean", "max"), per_tok=True, cache=False), model=made_model)
    yield directory / "esm_all.pt"
