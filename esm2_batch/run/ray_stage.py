"""The embedding stage on a Ray cluster (optional extra `[ray]`): `RayStage` implements
run/stages.py's EmbedStage protocol, so gene mode and FASTA mode run on Ray unchanged.

Why persistent actors fed by the driver rather than one Ray Data pipeline at the end:
a pipeline wants its whole input up front, so the driver held every sequence until
finish(), and its memory grew with the proteome. Here the driver keeps a bounded window:

- Fetching stays one rate-limited client on the driver (Ensembl's limit is per IP), and
  it runs while the actors embed. The driver gathers `window_rows` distinct sequences,
  sorts them by length (similar lengths pad little) and cuts them into tasks of
  `rows_per_task` rows; each actor has at most `tasks_per_actor` tasks in flight. When
  the window is full, `full()` says so and `wait_for_room()` (gene mode calls it from a
  worker thread while its event loop waits, so the sink still has one writer at a time)
  takes finished tasks until there is room: the fetcher waits for the actors. What the
  driver holds is then one window, the tasks in flight and one gene, whatever the number
  of proteins; a caller that never asks `full()` (FASTA mode submits its whole input at
  once) is held in `submit()` at two windows. When the actors have room and the fetcher
  is slow, a smaller window goes out at once rather than the actors idling.
- The actors start once per run, at the first task (a run with nothing to embed starts
  none), each loading the model once (`num_gpus=1`, or a share of the CPUs); a task is
  one call to an actor, which packs its rows into token-budget batches with
  `embed_rows`, as the single-process path. An actor that dies (a node lost, the OOM
  killer) is restarted by Ray and its task retried (`max_task_retries`); a task that
  keeps killing its actor has its sequences recorded as failed by key, as one that
  cannot be embedded is, and the run goes on. Actors that cannot start within
  `start_timeout_s` (the cluster lacks what they reserve) or cannot load the model are
  a ModelError, not a hang.
- Actors return float32 rows, as the in-process stage does (the sink decides what it
  stores); the driver writes them through the project's resumable store (atomic
  chunks), so resume, atomicity and ordering stay one mechanism.
- per_tok: [L, dim] states per protein are ~1,000x a pooled row, too much to ship through
  the driver. So each actor writes its states itself, as residue-store shards
  (store.residues.ShardBuffer, atomic and fsynced) straight into the store directory,
  under names unique to the actor (`ray-<actor>-<n>.safetensors`: actors never collide),
  and returns only the rows plus, per sequence, its shard and length. The driver, the
  index's one writer, names each finished shard (`ResidueWriter.adopt`) before it hands
  the rows to the sink, so crash safety and resume are the in-process store's: kill -9
  loses at most shards no index names yet, which are debris removed on the next open.
  The directory must be one every node shares: run/ray_cluster.py checks it first.
- The actors and the pool that feeds them are run/ray_actors.py; reaching the cluster
  (`--ray local` bound to 127.0.0.1), the GPU guard and the shared-directory check are
  run/ray_cluster.py, and all of those checks run in `start()`, before any fetching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from esm2_batch.embedding.budget import as_requested
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.models import LoadedModel
from esm2_batch.run.ray_actors import ActorPool, RayStats, ShardTarget, embed_on_ray
from esm2_batch.run.ray_cluster import (
    RayOptions,
    check_shared_directory,
    connect,
    portable_model,
    shutdown,
)
from esm2_batch.run.stages import Named, PendingSequences, ResidueSink, RowSink, StageOptions
from esm2_batch.store.keys import RowKeys
from esm2_batch.store.residues import ResidueWriter

__all__ = ["RayOptions", "RayStage", "RayStats", "embed_on_ray", "shutdown"]


class RayStage(PendingSequences):
    """The embedding stage on Ray: distinct pending sequences go to the actors a window
    at a time while the driver fetches, and their rows stream back into the sink. With
    `residues` (per_tok: a ResidueWriter) the actors write its shards and this process
    adopts them; a sequence counts as done only when both its row and its states are
    stored, as in the in-process stage."""

    def __init__(self, model: LoadedModel, sink: RowSink, options: EmbedOptions,
                 stage: StageOptions, *, keys: RowKeys, model_source: str,
                 device: str | None, residues: ResidueSink | None = None) -> None:
        super().__init__(model, sink, options, keys=keys, progress=stage.progress)
        if residues is not None and not isinstance(residues, ResidueWriter):
            raise TypeError("per_tok on Ray needs a ResidueWriter: actors write its shards")
        self.residues = residues
        if residues is not None:  # a row without its stored states is embedded again
            self.done &= residues.stored_keys()
        self.ray = RayOptions(address=stage.ray or "local", actors=stage.ray_actors,
                              device=device, engine=model.engine,
                              backend=model.backend,
                              dtype=str(model.dtype).removeprefix("torch."))
        self.model_source = portable_model(model_source)
        self.pool: ActorPool | None = None
        self._lengths: dict[str, int] = {}  # key -> residues, sent and not yet back

    @property
    def stats(self) -> RayStats | None:
        return None if self.pool is None else self.pool.stats

    def start(self) -> None:
        """Join the cluster and check its resources now, before any fetching; with
        per_tok also that every node sees the residue store's directory. The actors
        themselves start with the first task."""
        ray = connect(self.ray)
        writer = self.residues
        self.pool = ActorPool(ray, model=self.model_source, options=self.ray,  # sizes it:
                              embed=as_requested(self.options, self.model),  # GPU guard;
                              on_rows=self._on_rows,  # "auto" sized by each actor
                              on_failure=self._on_failure,
                              shards=None if writer is None else ShardTarget.of(writer),
                              on_shard=None if writer is None else writer.adopt)
        if writer is not None:
            check_shared_directory(ray, writer.directory, self.pool.reserve,
                                   self.ray.start_timeout_s)

    def submit(self, items: Sequence[Named]) -> None:
        """Queue sequences and send full windows. A caller that never asks `full()` (FASTA
        mode gives everything at once) is held here until the window has room again."""
        self._add(items)
        self._pump(block=False)
        while self._held() >= 2 * self._pool().window:
            self._pump(block=True)

    def full(self) -> bool:
        return self._held() >= self._pool().window

    def wait_for_room(self) -> None:
        """Take finished tasks (and send queued ones) until the window has room."""
        while self.full():
            self._pump(block=True)

    def raise_error(self) -> None:
        """Errors surface from submit(), wait_for_room() and finish() directly."""

    def finish(self) -> None:
        pool = self._pool()
        self._cut()  # the last window (and cached rows found since the one before)
        pool.drain()
        self.busy_s = pool.stats.wall_s
        self.budgets = dict(pool.stats.budgets)

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self._bar.close()

    def _pool(self) -> ActorPool:
        if self.pool is None:
            raise RuntimeError("RayStage.start() was not called")
        return self.pool

    def _held(self) -> int:
        """Sequences on the driver not yet sent to an actor."""
        return len(self._pending) + self._pool().queued

    def _pump(self, *, block: bool) -> None:
        """Cut a window when it is full, or when the actors have room and nothing else to
        do (a slow fetcher must not leave them idle); then send and take tasks."""
        pool = self._pool()
        waiting = len(self._pending)
        if waiting >= pool.window or (waiting >= self.ray.rows_per_task and not pool.ready
                                      and pool.room()):
            self._cut()
        pool.pump(block=block)

    def _cut(self) -> None:
        pending = self._take_pending()
        self._lengths.update((key, len(seq)) for key, (_, seq) in pending)
        self._pool().add_window([(key, name, seq) for key, (name, seq) in pending])

    def _on_rows(self, keys: list[str], rows: torch.Tensor) -> None:
        self._persist(keys, rows, [self._lengths.pop(k) for k in keys])

    def _on_failure(self, key: str, name: str, error: str) -> None:
        self._fail(key, name, error, self._lengths.pop(key))
