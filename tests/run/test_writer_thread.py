"""The thread stage's writer thread (run/row_writer.py): every store write happens there,
rows are written by count and by time (a fake clock here), a full disk ends the run with
exit 6 and nothing torn, the embedder stops at its next row, and the rerun after space
is freed gives the rows of an uninterrupted run."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.embedding.embed import Embedded
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.errors import StoreError
from esm2_batch.models import LoadedModel
from esm2_batch.run import stages
from esm2_batch.run.row_writer import Handoff
from esm2_batch.run.stages import ThreadStage
from esm2_batch.store.cache import RowCache
from esm2_batch.store.keys import RowKeys
from tests.run.test_interrupt import (
    assert_equals_a_clean_run,
    embedded_by,
    gene_inputs,
    stored_keys,
)

SEQS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLI", "MLSDEDFKAVFGMTRSAFANLPLWKQQNLK",
        "MAAAAGGGKKLLPEPTIDEWWRRSTTQQNN"]


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingSink:
    """A RowSink noting each write and the thread that made it."""

    def __init__(self, error: Exception | None = None) -> None:
        self.writes: list[list[str]] = []
        self.threads: set[str] = set()
        self.wrote = threading.Event()
        self.error = error

    def add_rows(self, keys: list[str], rows: torch.Tensor) -> None:
        self.threads.add(threading.current_thread().name)
        if self.error is not None:
            raise self.error
        self.writes.append(list(keys))
        self.wrote.set()

    def embedded_keys(self) -> set[str]:
        return set()


class RecordingResidues:
    """A ResidueSink noting the thread of each per_tok write."""

    def __init__(self) -> None:
        self.threads: set[str] = set()
        self.keys: list[str] = []

    def add(self, key: str, protein_id: str, residues: Sequence[torch.Tensor],
            row: torch.Tensor | None = None) -> None:
        self.threads.add(threading.current_thread().name)
        self.keys.append(key)

    def stored_keys(self) -> set[str]:
        return set()


def _stage(model: LoadedModel, sink: RecordingSink, **kwargs: Any) -> ThreadStage:
    options = EmbedOptions(toks_per_batch=64, per_tok="residues" in kwargs)
    return ThreadStage(model, sink, options.for_model(model.max_residues),
                       keys=RowKeys("scope"), progress=False, **kwargs)


def test_rows_are_written_after_flush_seconds_not_only_every_256(model: LoadedModel) -> None:
    clock, sink = FakeClock(), RecordingSink()
    stage = _stage(model, sink, clock=clock)
    batched = threading.Event()
    batch = stage.writer.batch
    add = batch.add

    def add_and_tell(item: Any) -> None:
        add(item)
        if len(batch.keys) == len(SEQS):
            batched.set()

    batch.add = add_and_tell  # type: ignore[method-assign]
    stage.start()
    try:
        stage.submit([(f"P{n}", s) for n, s in enumerate(SEQS)])  # 96 tokens: one window
        assert batched.wait(120)  # every row is with the writer, none written yet
        clock.now += ThreadStage.flush_seconds - 1
        assert not batch.due() and sink.writes == []
        clock.now += 1
        assert sink.wrote.wait(120)  # written by time, the stage still open
        assert sink.writes == [[RowKeys("scope").of(s) for s in SEQS]]
        stage.finish()
    finally:
        stage.stop()
    assert stage.embedded == len(SEQS)


def test_every_store_write_happens_on_the_writer_thread(model: LoadedModel,
                                                        tmp_path: Path) -> None:
    """Rows, per_tok states and row-cache puts; and cached rows too, on a second run."""
    residues = RecordingResidues()
    with RowCache(tmp_path / "cache") as cache:
        options = EmbedOptions(toks_per_batch=64).for_model(model.max_residues)
        view = cache.view(model, options)
        puts: set[str] = set()
        store = view.store

        def store_and_note(sequences: Sequence[str], rows: torch.Tensor) -> None:
            puts.add(threading.current_thread().name)
            store(sequences, rows)

        object.__setattr__(view, "store", store_and_note)  # a frozen dataclass
        for stage in (_stage(model, sink := RecordingSink(), residues=residues, cache=view),
                      _stage(model, again := RecordingSink(), cache=view)):
            stage.start()
            try:
                stage.submit([(f"P{n}", s) for n, s in enumerate(SEQS)])
                stage.finish()
            finally:
                stage.stop()
    assert sink.threads == again.threads == residues.threads == puts == {"esm2-write"}
    assert len(residues.keys) == len(SEQS) and stage.cached == len(SEQS)


def test_a_failing_writer_ends_the_stage_and_the_embedder_at_its_next_row(
        model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ThreadStage, "flush_rows", 1)  # the first row's write fails
    sink = RecordingSink(StoreError("rows/000000.pt: no space left on device"))
    stage = _stage(model, sink)
    after_failure = 0
    original = stages.embed_rows

    def watched(*args: Any) -> Iterator[Embedded]:
        nonlocal after_failure
        for result in original(*args):
            after_failure += stage.writer.error is not None
            yield result

    monkeypatch.setattr(stages, "embed_rows", watched)
    many = [(f"P{n}", s[n % 30:] + s[:n % 30]) for n, s in enumerate(SEQS * 20)]
    stage.start()
    with pytest.raises(StoreError, match="no space left"):
        try:
            stage.submit(many)
            stage.finish()
        finally:
            stage.stop()
    stage.join(timeout=120)  # both threads have ended; the Thread object follows
    assert stage.writer.finished.is_set() and not stage.is_alive()
    assert after_failure <= 1  # the embedder stopped at its first row after the failure
    assert stage.embedded == 0 and sink.writes == []


def test_handoff_is_bounded_in_items_and_bytes() -> None:
    handoff = Handoff(max_items=2, max_bytes=100)
    assert handoff.put("a", 60, timeout=0)
    assert not handoff.put("b", 60, timeout=0)  # 120 bytes
    assert handoff.put("c", 40, timeout=0)
    assert not handoff.put("d", 0, timeout=0)  # 3 items
    assert handoff.put("end", 0, force=True)  # an end marker always goes in
    assert [handoff.get(0) for _ in range(4)] == ["a", "c", "end", None]
    assert handoff.put("alone, larger than the bound", 1000, timeout=0)


# -- a full disk under the CLI -----------------------------------------------------------------
@pytest.mark.slow
def test_disk_full_in_the_writer_is_exit_6_one_line_and_the_rerun_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = gene_inputs(tmp_path, genes=100)  # 300 sequences: a 256-row chunk, then more
    out = tmp_path / "esm_all.pt"
    args = ["--hvg_file", str(inputs.hvg), "--isoforms", str(inputs.isoforms), "--out",
            str(out), "--model_path", str(inputs.checkpoint), "--toks_per_batch", "1024",
            "-q", "--no_cache"]
    real_save = torch.save
    saves = 0

    def save_until_full(obj: object, handle: BinaryIO, *rest: Any, **kw: Any) -> None:
        nonlocal saves
        saves += 1
        if saves == 1:
            real_save(obj, handle, *rest, **kw)
            return
        handle.write(b"the first bytes of a chunk")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as full:
        full.setattr(torch, "save", save_until_full)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 6, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("esm2-batch: error: ") and "no space left on device" in line
    assert line.endswith("free space and rerun the same command to resume")
    assert not out.exists()
    kept = stored_keys(out)  # whole chunks only, no temporary file
    assert 0 < len(kept) < inputs.sequences

    asked, _ = embedded_by(args, monkeypatch)  # space freed
    assert len(asked) == inputs.sequences - len(kept)
    assert_equals_a_clean_run(inputs, out, tmp_path / "clean.pt")
