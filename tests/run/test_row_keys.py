"""Rows are reused only when everything that determines them matches (issue: rows of other
settings or other weights were mixed into a run that exited 0)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from esm2_batch.errors import StoreError
from esm2_batch.models import LoadedModel, load_model
from esm2_batch.run.config import RunConfig
from esm2_batch.run.gene_mode import partial_dir, run, run_settings
from esm2_batch.store.esm_file import read_esm_file
from esm2_batch.store.keys import RowKeys, settings_scope
from esm2_batch.store.partial import PartialStore
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.fakes.tiny_esm import write_tiny_checkpoint
from tests.run.flat import make_config, with_flags

GENES = [braf(), *synthetic_genes(6, coding=2, nmd=0)]
POISON = 7.0  # no real row is constant: a constant row means a stale row was reused


@pytest.fixture
def url() -> Iterator[str]:
    with FakeEnsembl(GENES).running_in_thread() as address:
        yield address


def config_for(tmp_path: Path, url: str, queries: list[str], **flags: object) -> RunConfig:
    hvg = tmp_path / f"hvg{len(queries)}.txt"
    hvg.write_text("\n".join(queries) + "\n")
    return make_config(hvg_file=hvg, out=tmp_path / "esm_all.pt", ensembl_url=url,
                       rate_limit=1000.0, progress=False, **flags)


def braf_sequences() -> list[str]:
    """BRAF's protein-coding sequences, as the run will fetch them."""
    return [t.sequence for t in braf().transcripts
            if t.sequence and t.biotype == "protein_coding"]


def poison_partial_store(config: RunConfig, model: LoadedModel, sequences: list[str]) -> None:
    """A partial store holding constant rows for `sequences` under `config`'s keys."""
    settings = run_settings(config, model)
    store = PartialStore(partial_dir(config.out), settings)
    keys = RowKeys(settings_scope(settings))
    store.add_rows([keys.of(s) for s in sequences],
                   torch.full((len(sequences), model.embed_dim), POISON))


def test_rows_of_other_settings_are_never_reused_without_settings_json(
        tmp_path: Path, url: str, model: LoadedModel) -> None:
    full = config_for(tmp_path, url, ["BRAF"])
    sequences = braf_sequences()
    poison_partial_store(full, model, sequences)
    (partial_dir(full.out) / "settings.json").unlink()  # the proof of their settings is gone
    run(with_flags(full, truncation=500), model=model)
    emb = read_esm_file(full.out).emb.float()
    assert not bool((emb == POISON).all(dim=1).any())  # recomputed at 500, not reused


def test_rows_with_matching_keys_are_reused(tmp_path: Path, url: str,
                                            model: LoadedModel) -> None:
    """The other side of the same rule: an exact key match is what resume reuses."""
    config = config_for(tmp_path, url, ["BRAF"])
    sequences = braf_sequences()
    poison_partial_store(config, model, sequences)
    run(config, model=model)
    assert bool((read_esm_file(config.out).emb.float() == POISON).all())


def test_other_weights_under_the_same_file_name_are_refused(tmp_path: Path, url: str) -> None:
    weights = tmp_path / "model"
    weights.mkdir()
    path = write_tiny_checkpoint(weights, num_layers=2, embed_dim=32, seed=0)
    first = load_model(path, device="cpu")
    run(config_for(tmp_path, url, ["BRAF", "GENE0001"]), model=first)
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    shutil.copy(write_tiny_checkpoint(tuned_dir, num_layers=2, embed_dim=32, seed=1),
                path)  # fine-tuned weights saved under the same name
    tuned = load_model(path, device="cpu")
    assert tuned.name == first.name and tuned.fingerprint != first.fingerprint
    longer = config_for(tmp_path, url, ["BRAF", "GENE0001", "GENE0002"])
    with pytest.raises(StoreError, match=r"exists with other settings \(weights: "):
        run(longer, model=tuned)
    run(with_flags(longer, overwrite=True), model=tuned)
    assert read_esm_file(longer.out).meta["weights"] == tuned.fingerprint


def test_weights_fingerprint_ignores_the_compute_dtype(checkpoint: Path) -> None:
    fp32 = load_model(checkpoint, device="cpu")
    bf16 = load_model(checkpoint, device="cpu", dtype="bfloat16")
    assert fp32.fingerprint == bf16.fingerprint and len(fp32.fingerprint) == 32
