"""The embedding stage: one protocol, two implementations (a thread here, Ray actors in
ray_stage.py), used by gene mode and FASTA mode alike.

    producer (fetching, or a FASTA file)          stage
    submit([(name, sequence), ...]) ──► distinct sequences not yet embedded
                                         │ token-budget batches (embedding.embed_rows)
                                         ▼
                                   RowSink.add_rows(keys, float32 rows)
                                   (the thread stage: on its writer thread, run/row_writer.py,
                                   every 256 rows or 30 s and at once when stopped)

With several layers or poolers (EmbedOptions.matrices), a row is every pooled vector side
by side, [n_matrices * dim] in matrices order (`Embedded.packed`): one tensor per
sequence, so a store holds all of a row's matrices or none of them.

Rows are keyed by `store.keys.RowKeys` (the run's settings digest and the sequence), so a
sequence shared by several genes or FASTA records is embedded once, and a row made under
other settings or weights never stands in for one of this run. Every stage hands the sink
float32 rows exactly as the embedder returns them; the sink decides what it stores (the
partial store float16, FASTA mode float32), so both stages give the same rows in the same
dtype for the same input.
A sequence that cannot be embedded is recorded in `failed` by key, never dropped silently.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from esm2_batch.embedding.embed import embed_rows
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.embedding.sequences import clean_sequence
from esm2_batch.errors import InputError, StoreError
from esm2_batch.models import LoadedModel
from esm2_batch.run.row_writer import Clock, Finished, RowBatch, RowWriter
from esm2_batch.store.cache import CacheView, RowCache, open_row_cache
from esm2_batch.store.keys import RowKeys

log = logging.getLogger("esm2_batch")

Named = tuple[str, str]
"""(name, sequence): a protein ID or a FASTA label, and its residues."""


class RowSink(Protocol):
    """Where a stage's rows go: the resumable partial store, or memory (FASTA mode)."""

    def add_rows(self, keys: list[str], rows: torch.Tensor) -> None:
        """Keep rows [k, dim] (float32, CPU) under their sequence keys."""

    def embedded_keys(self) -> set[str]:
        """Keys already held (from an earlier attempt): never embedded again."""


@dataclass
class MemorySink:
    """Rows kept in memory as given (float32): FASTA mode's sink."""

    rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_rows(self, keys: list[str], rows: torch.Tensor) -> None:
        self.rows.update(zip(keys, rows, strict=True))

    def embedded_keys(self) -> set[str]:
        return set(self.rows)


class ResidueSink(Protocol):
    """Where per_tok states go (store.residues.ResidueWriter): by sequence key, with the
    protein id they were embedded for."""

    def add(self, key: str, protein_id: str, residues: Sequence[torch.Tensor],
            row: torch.Tensor | None = None) -> None:
        """Keep one sequence's [L, dim] states, one per layer (`row`: its pooled row,
        for a sink that keeps it too)."""

    def stored_keys(self) -> set[str]:
        """Keys whose states are already held: with the sink's, never embedded again."""


class EmbedStage(Protocol):
    """What an orchestrator drives; it never asks which implementation it holds."""

    failed: dict[str, tuple[str, str]]  # sequence key -> (name, error)
    embedded: int  # rows embedded by this stage (reused rows not counted)
    cached: int  # rows the shared row cache gave (not embedded)
    tokens: int  # tokens embedded, BOS and EOS included
    busy_s: float  # seconds spent embedding
    budgets: dict[str, int]  # tokens per batch of each remote embedder (Ray actor tag)

    def start(self) -> None:
        """Acquire what the stage needs (a thread, a cluster) or fail now, before fetching."""

    def submit(self, items: Sequence[Named]) -> None:
        """Queue sequences; may block while the stage is full (backpressure)."""

    def full(self) -> bool:
        """True when `submit` would block."""

    def wait_for_room(self) -> None:
        """Block until `submit` would not (call it from a worker thread in async code)."""

    def raise_error(self) -> None:
        """Raise the stage's first error, if it had one."""

    def finish(self) -> None:
        """No more input: embed what is pending, wait, and raise the first error."""

    def stop(self) -> None:
        """Release everything (always called, after finish or after an error)."""


class PendingSequences:
    """What every stage shares: distinct sequences not yet embedded, rows handed to the
    sink (and to the shared row cache, which also answers before anything is embedded),
    failures recorded by key, and the residues-embedded progress bar.

    A sequence is in exactly one of: pending (`_pending`), being embedded or on its way
    to the sink (`_taken`), stored (`done`) or `failed`; `_write` marks it done before
    it leaves `_taken`, so a sequence submitted again meanwhile is never embedded twice.
    """

    flush_rows = 256  # rows per sink write (at most; the thread stage also writes by time)

    def __init__(self, model: LoadedModel, sink: RowSink, options: EmbedOptions, *,
                 keys: RowKeys, progress: bool, cache: CacheView | None = None) -> None:
        self.model, self.sink, self.options, self.keys = model, sink, options, keys
        self.done: set[str] = sink.embedded_keys()
        self.failed: dict[str, tuple[str, str]] = {}
        self.embedded = self.tokens = self.cached = 0
        self.busy_s = 0.0
        # what each remote embedder planned with (Ray: actor tag -> tokens per batch, each
        # sized on its own device); empty when this process embeds: its own sizing is it
        self.budgets: dict[str, int] = {}
        self._pending: dict[str, Named] = {}
        self.cache: CacheView | None = None
        self._read_cache = False
        self.use_cache(cache)
        self._hits = RowBatch(self._write, self.flush_rows)
        self._taken: dict[str, str] = {}  # key -> sequence, embedding now
        self._bar_lock = threading.Lock()  # the embedding and writer threads both count
        self._bar = tqdm(total=0, desc="residues embedded", unit="aa", unit_scale=True,
                         disable=None if progress else True)

    def use_cache(self, cache: CacheView | None) -> None:
        """Read and fill the shared row cache (store/cache.py); it is only read without
        per_tok, whose residue states a cached row cannot give."""
        self.cache = cache
        self._read_cache = cache is not None and not self.options.per_tok

    def _add(self, items: Sequence[Named]) -> None:
        fresh: dict[str, Named] = {}
        for name, sequence in items:
            key = self.keys.of(sequence)
            if (key in self.done or key in self._pending or key in self.failed
                    or key in self._taken or key in fresh):
                continue
            try:
                clean_sequence(sequence, name=name)
            except InputError as exc:  # one odd sequence must not stop the run
                self.failed[key] = (name, str(exc))
                continue
            fresh[key] = (name, sequence)
        for key in self._from_cache(fresh):
            del fresh[key]
        for key, (name, sequence) in fresh.items():
            self._pending[key] = (name, sequence)
            self._bar.total = (self._bar.total or 0) + self.options.kept(len(sequence))
        self._bar.refresh()

    def _from_cache(self, fresh: dict[str, Named]) -> list[str]:
        """Keys of `fresh` whose rows the shared cache holds: queued for the sink as they
        are (`_keep_hit`), not embedded."""
        if not self._read_cache or not fresh or self.cache is None:
            return []
        keys = list(fresh)
        hits = self.cache.lookup([fresh[k][1] for k in keys])
        for position, row in hits.items():
            key = keys[position]
            self.done.add(key)
            self._keep_hit(Finished(key, fresh[key][0], row, len(fresh[key][1]), fresh=False))
        self.cached += len(hits)
        return [keys[p] for p in hits]

    def _keep_hit(self, item: Finished) -> None:
        """A cached row for the sink: with the next embedded ones, or at `_take_pending`."""
        self._hits.add(item)

    def _tokens_pending(self) -> int:
        return sum(self.options.tokens(len(s)) for _, s in self._pending.values())

    def _take_pending(self) -> list[tuple[str, Named]]:
        """The pending sequences, to embed now (cached rows found so far go to the sink
        first, so a run of cache hits is stored before any long forward pass)."""
        self._hits.flush()
        pending = list(self._pending.items())
        self._pending.clear()
        self._taken.update((key, sequence) for key, (_, sequence) in pending)
        return pending

    def _persist(self, keys: list[str], rows: torch.Tensor, lengths: Sequence[int]) -> None:
        """Rows this stage embedded, to the sink and the shared cache (the Ray driver's
        entry point; the thread stage's writer calls `_write`)."""
        if keys:
            self._write(list(keys), rows, list(lengths), [True] * len(keys))

    def _write(self, keys: list[str], rows: torch.Tensor, lengths: list[int],
               fresh: list[bool]) -> None:
        """Hand rows to the sink, count them as done, and put the freshly embedded ones
        (`fresh`; the others came from the cache) into the shared cache."""
        self.sink.add_rows(keys, rows)
        self.done.update(keys)  # before they leave `_taken` (see the class docstring)
        new = [n for n, is_new in enumerate(fresh) if is_new]
        sequences = [self._taken.pop(keys[n], "") for n in new]
        if self.cache is not None and sequences and all(sequences):
            self.cache.store(sequences, rows[new] if len(new) < len(keys) else rows)
        self.embedded += len(new)
        self.tokens += sum(self.options.tokens(lengths[n]) for n in new)
        self._advance(sum(self.options.kept(lengths[n]) for n in new))

    def _fail(self, key: str, name: str, error: str, length: int) -> None:
        self.failed[key] = (name, error)
        self._taken.pop(key, None)
        self._advance(self.options.kept(length))

    def _advance(self, residues: int) -> None:
        if residues:
            with self._bar_lock:
                self._bar.update(residues)


class ThreadStage(PendingSequences, threading.Thread):
    """The in-process stage: an embedding thread collects a window of distinct pending
    sequences and embeds them; a writer thread (run/row_writer.py) stores the rows.

    It embeds when the window holds `window_batches` batches' worth of tokens, or when
    the queue runs dry with at least one batch's worth waiting (the device would idle
    otherwise), or at the end. Within a window, embed_rows sorts by length and packs
    token-budget batches; each finished sequence goes to the writer at once, which
    writes rows every `flush_rows` rows or `flush_seconds` seconds (by `clock`), and,
    when the stage is stopped (Ctrl-C, SIGTERM, an error), everything it was handed
    before the embedding thread ends: nothing embedded is thrown away.
    """

    window_batches = 8
    flush_seconds = 30.0
    _CLOSE: Sequence[Named] = (("", ""),)  # a sentinel no caller can submit (empty names)

    def __init__(self, model: LoadedModel, sink: RowSink, options: EmbedOptions, *,
                 keys: RowKeys, progress: bool, queue_items: int = 256,
                 residues: ResidueSink | None = None, cache: CacheView | None = None,
                 clock: Clock = time.monotonic) -> None:
        PendingSequences.__init__(self, model, sink, options, keys=keys, progress=progress,
                                  cache=cache)
        self.residues = residues
        if residues is not None:  # a row without its stored states is embedded again
            self.done &= residues.stored_keys()
        threading.Thread.__init__(self, name="esm2-embed", daemon=True)
        self.queue: queue.Queue[Sequence[Named]] = queue.Queue(maxsize=queue_items)
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._ended = threading.Event()
        self.writer = RowWriter(self._write, size=self.flush_rows, seconds=self.flush_seconds,
                                urgent=self._stopping, clock=clock,
                                states=None if residues is None else self._store_states)

    def start(self) -> None:
        self.writer.start()
        threading.Thread.start(self)

    # producer side
    def submit(self, items: Sequence[Named]) -> None:
        self.raise_error()
        while not self._stopping.is_set():
            try:
                self.queue.put(items, timeout=0.2)
                return
            except queue.Full:
                self.raise_error()

    def full(self) -> bool:
        return self.queue.full()

    def wait_for_room(self) -> None:
        while (self.queue.full() and not self._ended.is_set()
               and not self._stopping.is_set() and self.writer.error is None):
            time.sleep(0.01)

    def finish(self) -> None:
        self.submit(self._CLOSE)
        self._wait()
        self.raise_error()

    def stop(self) -> None:
        """Ask the threads to end and wait for them: the writer writes every row it was
        handed (at once: `_stopping` is its cue), and no torch work outlives the run."""
        self._stopping.set()
        if threading.current_thread() is not self:
            self._wait()
        self._bar.close()

    def _wait(self) -> None:
        """Until both threads have ended (if started). Events, not Thread.join: on Python
        3.11 a join interrupted by Ctrl-C marks the still running thread as ended, and the
        interrupted run then exited while rows were being embedded, unwritten."""
        if self.ident is not None:
            self._ended.wait()
            self.writer.wait()

    def raise_error(self) -> None:
        error = self.error or self.writer.error
        if error is not None:
            raise error

    # embedding side
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # handed to the producer, which raises it
            self.error = exc
        finally:
            self.writer.close()  # it writes what it holds, then ends
            self._ended.set()

    def _loop(self) -> None:
        budget = self.options.toks_per_batch
        closed = False
        while not self._stopping.is_set() and self.writer.error is None:
            closed = self._drain(block=not closed and self._tokens_pending() < budget) or closed
            waiting = self._tokens_pending()
            if closed or waiting >= budget * self.window_batches or (
                    waiting >= budget and self.queue.empty()):
                self._embed_pending()
            if closed and not self._pending:
                return

    def _drain(self, *, block: bool) -> bool:
        """Move queued sequences into the window; True once closed."""
        try:
            item = self.queue.get(timeout=0.1) if block else self.queue.get_nowait()
        except queue.Empty:
            return False
        while True:
            if item is self._CLOSE:
                return True
            self._add(item)
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return False

    def _keep_hit(self, item: Finished) -> None:
        self.writer.put(item)  # every store write happens on the writer thread

    def _embed_pending(self) -> None:
        pending = self._take_pending()
        if not pending:
            return
        started = time.perf_counter()
        per_tok = self.residues is not None
        try:
            for result in embed_rows(self.model, [named for _, named in pending],
                                     self.options):
                key, (name, sequence) = pending[result.index]
                if result.packed is None:
                    self._fail(key, name, str(result.error), len(sequence))
                else:
                    self.writer.put(Finished(key, name, result.packed, len(sequence),
                                             residues=result.residues if per_tok else ()))
                if self._stopping.is_set():  # this row is kept; the next is not started
                    break
        finally:
            self.busy_s += time.perf_counter() - started

    def _store_states(self, item: Finished) -> None:
        """per_tok: a sequence's states to the residue writer (on the writer thread)."""
        assert self.residues is not None
        self.residues.add(item.key, item.name, item.residues, item.row)


@dataclass(frozen=True)
class StageOptions:
    """How the embedding stage runs: in this process, or on Ray (`ray` is "local",
    "auto" or a cluster address; `ray_actors` defaults to one per GPU, else CPUs / 2).
    `cache`: read and fill the row cache shared across runs (store/cache.py) in
    `cache_dir` (None: $ESM2_BATCH_CACHE_DIR, else ~/.cache/esm2_batch/rows)."""

    ray: str | None = None
    ray_actors: int | None = None
    queue_items: int = 256
    progress: bool = True
    cache: bool = True
    cache_dir: Path | None = None

    def open_cache(self) -> RowCache | None:
        """The run's row cache, or None with --no_cache. A --cache_dir the user named
        that cannot be opened is a StoreError now; the default one, a warning (the run
        goes on without a cache it never asked for)."""
        try:
            return open_row_cache(self.cache_dir, enabled=self.cache)
        except StoreError as exc:
            if self.cache_dir is not None:
                raise
            log.warning("%s", exc)
            return None
