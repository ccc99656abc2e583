"""The shared row cache: keyed by what a row depends on, exact rows back, prune, info,
damage is a warning, and a stage that finds its rows there embeds nothing."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch

from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.errors import StoreError
from esm2_batch.models import LoadedModel
from esm2_batch.run.stages import MemorySink, ThreadStage
from esm2_batch.store import cache as cache_module
from esm2_batch.store.cache import DB_FILE, RowCache, default_cache_dir, open_row_cache
from esm2_batch.store.keys import RowKeys

SEQS = ["MKTAYIAKQR", "MLSDEDFKAV", "MAAAAGGGKKLL", "MPEPTIDE"]


def _embed(model: LoadedModel, cache: RowCache | None, options: EmbedOptions,
           sequences: list[str]) -> tuple[ThreadStage, MemorySink]:
    sink = MemorySink()
    view = cache.view(model, options) if cache is not None else None
    stage = ThreadStage(model, sink, options, keys=RowKeys("scope"), progress=False,
                        cache=view)
    stage.start()
    try:
        stage.submit([(f"P{n}", s) for n, s in enumerate(sequences)])
        stage.finish()
    finally:
        stage.stop()
    return stage, sink


def test_second_stage_takes_every_row_from_the_cache_bit_for_bit(
        model: LoadedModel, tmp_path: Path) -> None:
    options = EmbedOptions().for_model(model.max_residues)
    with RowCache(tmp_path / "cache") as cache:
        first, fresh = _embed(model, cache, options, SEQS[:3])
        second, again = _embed(model, cache, options, SEQS)
    assert (first.embedded, first.cached) == (3, 0)
    assert (second.embedded, second.cached) == (1, 3)  # only the new sequence embedded
    for key, row in fresh.rows.items():
        assert torch.equal(again.rows[key], row)  # float32 stored, float32 back


def test_several_matrices_are_cached_one_by_one(model: LoadedModel, tmp_path: Path) -> None:
    """A run asking for (mean, L1) reuses what a (mean+max, L1) run stored: rows are keyed
    per (layer, pooler), not per combination."""
    both = dataclasses.replace(EmbedOptions(include=("mean", "max"), repr_layers=(1,)),
                               repr_layer=1).for_model(model.max_residues)
    only_max = dataclasses.replace(EmbedOptions(include=("max",), repr_layers=(1,)),
                                   pooling="max", repr_layer=1).for_model(model.max_residues)
    with RowCache(tmp_path / "cache") as cache:
        _, packed = _embed(model, cache, both, SEQS)
        stage, single = _embed(model, cache, only_max, SEQS)
    assert (stage.embedded, stage.cached) == (0, len(SEQS))
    dim = model.embed_dim
    for key, row in single.rows.items():
        assert torch.equal(row, packed.rows[key][dim:])


def test_other_settings_never_hit(model: LoadedModel, tmp_path: Path) -> None:
    options = EmbedOptions().for_model(model.max_residues)
    with RowCache(tmp_path / "cache") as cache:
        _embed(model, cache, options, SEQS)
        for other in (dataclasses.replace(options, truncation=5),
                      dataclasses.replace(options, repr_layer=1),
                      dataclasses.replace(options, pooling="bos")):
            stage, _ = _embed(model, cache, other, SEQS)
            assert (stage.embedded, stage.cached) == (len(SEQS), 0), other
        other_weights = dataclasses.replace(model, fingerprint="another")
        stage, _ = _embed(other_weights, cache, options, SEQS)
        assert stage.cached == 0
        half = SimpleNamespace(name=model.name, fingerprint=model.fingerprint,
                               embed_dim=model.embed_dim, num_layers=model.num_layers,
                               dtype=torch.float16)
        assert (cache.view(cast(LoadedModel, half), options).scopes
                != cache.view(model, options).scopes)


def test_per_tok_writes_the_cache_but_never_reads_it(model: LoadedModel,
                                                     tmp_path: Path) -> None:
    """A cached row cannot give residue states: per_tok embeds, and stores its rows."""
    options = EmbedOptions().for_model(model.max_residues)
    with RowCache(tmp_path / "cache") as cache:
        _embed(model, cache, options, SEQS)
        stage, _ = _embed(model, cache, dataclasses.replace(options, per_tok=True), SEQS)
    assert (stage.embedded, stage.cached) == (len(SEQS), 0)


def test_info_and_prune(model: LoadedModel, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    options = EmbedOptions().for_model(model.max_residues)
    with RowCache(tmp_path / "cache") as cache:
        monkeypatch.setattr(cache_module, "_today", lambda: 100)
        _embed(model, cache, options, SEQS[:2])
        monkeypatch.setattr(cache_module, "_today", lambda: 130)
        _embed(model, cache, dataclasses.replace(options, repr_layer=1), SEQS)
        info = cache.info()
        assert info.rows == 6 and len(info.scopes) == 2
        assert info.scopes[0].rows == 4 and info.scopes[0].settings["layer"] == 1
        assert info.scopes[0].bytes == 4 * model.embed_dim * 4
        text = "\n".join(info.describe())
        assert "6 rows in 2 settings" in text and model.fingerprint[:12] in text
        assert cache.prune(older_than_days=10) == 2  # the day-100 rows
        assert cache.prune(max_bytes=2 * model.embed_dim * 4) == 2
        assert cache.info().rows == 2
        assert cache.prune(weights="nomatch") == 0
        assert cache.prune(weights=model.fingerprint[:8]) == 2
        assert cache.info().scopes == []


def test_prune_least_recently_used_first(model: LoadedModel, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    options = EmbedOptions().for_model(model.max_residues)
    with RowCache(tmp_path / "cache") as cache:
        monkeypatch.setattr(cache_module, "_today", lambda: 100)
        _embed(model, cache, options, SEQS)
        monkeypatch.setattr(cache_module, "_today", lambda: 105)
        _embed(model, cache, options, SEQS[:1])  # a hit: SEQS[0] used again today
        cache.prune(max_bytes=model.embed_dim * 4)
        stage, _ = _embed(model, cache, options, SEQS)
        assert (stage.cached, stage.embedded) == (1, 3)


def test_a_damaged_cache_is_a_warning_and_the_run_goes_on(
        model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    options = EmbedOptions().for_model(model.max_residues)
    with RowCache(tmp_path / "cache") as cache:
        _embed(model, cache, options, SEQS)
        cache._db.execute("DROP TABLE rows")  # what a damaged file reads as
        with caplog.at_level(logging.WARNING, logger="esm2_batch"):
            stage, sink = _embed(model, cache, options, SEQS)
    assert stage.embedded == len(SEQS) and len(sink.rows) == len(SEQS)
    assert "going on without it" in caplog.text and not cache.enabled


def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / DB_FILE).write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match=r"--cache_dir .*--no_cache") as caught:
        RowCache(directory)
    assert "\n" not in str(caught.value)


def test_two_processes_share_one_cache(model: LoadedModel, tmp_path: Path) -> None:
    """Two connections (two runs at once) see each other's committed rows."""
    options = EmbedOptions().for_model(model.max_residues)
    with RowCache(tmp_path / "c") as one, RowCache(tmp_path / "c") as two:
        _embed(model, one, options, SEQS[:2])
        stage, _ = _embed(model, two, options, SEQS)
    assert (stage.cached, stage.embedded) == (2, 2)
    with sqlite3.connect(tmp_path / "c" / DB_FILE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_rows_are_float32_bytes_of_their_dim(model: LoadedModel, tmp_path: Path) -> None:
    options = EmbedOptions().for_model(model.max_residues)
    with RowCache(tmp_path / "c") as cache:
        view = cache.view(model, options)
        row = torch.arange(model.embed_dim, dtype=torch.float16).reshape(1, -1)
        view.store(["MKV"], row)  # any dtype in, float32 kept
        got = view.lookup(["MKV", "MKW"])
        assert list(got) == [0] and got[0].dtype == torch.float32
        assert np.array_equal(got[0].numpy(), np.arange(model.embed_dim, dtype=np.float32))


def test_default_directory_and_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.delenv(cache_module.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "esm2_batch" / "rows"
    monkeypatch.setenv(cache_module.CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert open_row_cache(None, enabled=False) is None
    opened = open_row_cache(None)
    assert opened is not None and opened.path == tmp_path / "mine" / DB_FILE
    opened.close()
