"""The writer thread: where finished rows become durable, off the thread that runs the
model.

    embedding thread ──put(Finished)──► Handoff (bounded) ──► writer thread
      forward, pool, next batch            backpressure:         states (per_tok shards)
      (never waits on a disk)              items and bytes       RowBatch: every `size` rows
                                                                  or `seconds`, at stop, at end
                                                                  ──► write(keys, rows, ...):
                                                                      sink, row cache, counts

Why a thread of its own: a rows chunk is written and fsynced, a row-cache put is a
SQLite transaction and a per_tok shard can be hundreds of MB; done on the embedding
thread, the device would wait for the disk between batches. One thread owns every write
of a run (the sink, the residue writer, the row cache), so none of them needs locking,
and a chunk number is never taken twice.

Why bounded: a disk slower than the model must slow the model down rather than fill the
memory with rows (or per_tok states) waiting to be written. The bound is in items and in
bytes, so a queue of per_tok states stays small while one of pooled rows stays deep.

When rows are written (the promise README's "Resuming" makes): once `size` rows wait,
once the oldest waiting row is `seconds` old (so a slow model on a CPU does not hold an
hour of rows in memory), as soon as the run is asked to stop (Ctrl-C, SIGTERM: `urgent`
is set, and what is queued is written within a tick, without waiting for the forward
pass still running), and at the end. A failure of the
writer (a full disk is a StoreError) is kept in `error`; from then on `put` raises it,
so the embedding thread stops at its next row instead of filling a queue nobody reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Finished", "Handoff", "RowBatch", "RowWriter"]

Clock = Callable[[], float]


@dataclass(frozen=True)
class Finished:
    """One embedded sequence on its way to the stores.

    `fresh`: computed by this run (False: a row the shared row cache gave, which is
    stored again but neither counted as embedded nor put back into the cache);
    `residues`: its per_tok states, one [L, dim] per layer (empty without per_tok)."""

    key: str
    name: str
    row: torch.Tensor
    length: int
    fresh: bool = True
    residues: Sequence[torch.Tensor] = ()

    @property
    def nbytes(self) -> int:
        return int(self.row.nbytes) + sum(int(r.nbytes) for r in self.residues)


Write = Callable[[list[str], torch.Tensor, list[int], list[bool]], None]
"""write(keys, rows [k, width], lengths, fresh): one batch of rows to every store."""


@dataclass
class RowBatch:
    """Rows collected until `size` of them wait or the oldest has waited `seconds` (by
    `clock`, injectable so tests need no real waiting), then written together: one sink
    write, one cache transaction, not one per row."""

    write: Write
    size: int
    seconds: float = float("inf")
    clock: Clock = time.monotonic
    keys: list[str] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    fresh: list[bool] = field(default_factory=list)
    oldest: float = 0.0

    def add(self, item: Finished) -> None:
        if not self.keys:
            self.oldest = self.clock()
        self.keys.append(item.key)
        self.rows.append(item.row)
        self.lengths.append(item.length)
        self.fresh.append(item.fresh)
        if len(self.keys) >= self.size:
            self.flush()

    def due(self) -> bool:
        """Whether the oldest waiting row has waited `seconds`."""
        return bool(self.keys) and self.clock() - self.oldest >= self.seconds

    def flush(self) -> None:
        if self.keys:
            keys, rows, lengths, fresh = self.keys, self.rows, self.lengths, self.fresh
            self.keys, self.rows, self.lengths, self.fresh = [], [], [], []
            self.write(keys, torch.stack(rows), lengths, fresh)


class Handoff:
    """A FIFO bounded by items and by bytes; one item larger than the byte bound still
    passes when the queue is empty (it must, or it would wait forever)."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max(1, max_items), max(1, max_bytes)
        self._items: deque[tuple[object, int]] = deque()
        self._bytes = 0
        self._changed = threading.Condition()

    def put(self, item: object, size: int, timeout: float | None = None, *,
            force: bool = False) -> bool:
        """Append `item` (`size` bytes); False if there was no room within `timeout`.
        `force` appends at once whatever the bounds (an end marker)."""
        with self._changed:
            if not force and not self._changed.wait_for(lambda: self._room(size), timeout):
                return False
            self._items.append((item, size))
            self._bytes += size
            self._changed.notify_all()
            return True

    def _room(self, size: int) -> bool:
        return not self._items or (len(self._items) < self.max_items
                                   and self._bytes + size <= self.max_bytes)

    def get(self, timeout: float) -> object | None:
        """The oldest item, or None when none came within `timeout`."""
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self._items), timeout):
                return None
            item, size = self._items.popleft()
            self._bytes -= size
            self._changed.notify_all()
            return item

    def __len__(self) -> int:
        return len(self._items)


_CLOSE = object()


class RowWriter(threading.Thread):
    """The writer thread (see the module docstring). `write` is called with each batch
    of rows; `states` (per_tok) with each sequence that carries residue states, as it
    arrives: the residue writer is then touched by this thread only."""

    tick_s = 0.1  # how often an idle writer looks at the clock and at `urgent`

    def __init__(self, write: Write, *, size: int, seconds: float, urgent: threading.Event,
                 states: Callable[[Finished], None] | None = None,
                 clock: Clock = time.monotonic,
                 max_items: int = 1024, max_bytes: int = 512 * 2**20) -> None:
        super().__init__(name="esm2-write", daemon=True)
        self.batch = RowBatch(write, size, seconds, clock)
        self.states = states
        self.urgent = urgent
        self.handoff = Handoff(max_items, max_bytes)
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def put(self, item: Finished) -> None:
        """Hand over one sequence, waiting while the queue is full; raises the writer's
        error once it has failed (the caller stops embedding)."""
        while not self.handoff.put(item, item.nbytes, timeout=self.tick_s):
            self.check()
        self.check()

    def check(self) -> None:
        """Raise the writer's error, if it failed."""
        if self.error is not None:
            raise self.error
        if self.finished.is_set():
            raise RuntimeError("the row writer has already ended")

    def close(self) -> None:
        """No more rows: the writer writes what it holds and ends (never blocks)."""
        self.handoff.put(_CLOSE, 0, force=True)

    def wait(self) -> None:
        """Until the writer has ended (after close()). An Event, not Thread.join: on
        Python 3.11 a join interrupted by Ctrl-C marks a running thread as ended."""
        if self.ident is not None:
            self.finished.wait()

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # handed to the stage, which raises it
            self.error = exc
        finally:
            self.finished.set()

    def _loop(self) -> None:
        while True:
            item = self.handoff.get(self.tick_s)
            if item is _CLOSE:
                self.batch.flush()
                return
            if isinstance(item, Finished):
                if self.states is not None and item.residues:
                    self.states(item)
                self.batch.add(item)
            if self.batch.due() or (self.urgent.is_set() and not self.handoff):
                self.batch.flush()  # stopping: once nothing more is queued right now
