"""The Ray side of the embedding stage (run/ray_stage.py): the actors and the pool that
feeds them.

`EmbedActor` loads the model once and embeds tasks of (key, name, sequence) as the
single-process path does (`embed_rows`: token-budget batches), returning float32 rows and,
with per_tok, writing its own residue shards. `ActorPool` starts the actors once per run,
keeps at most `tasks_per_actor` tasks in flight on each, and hands every finished task's
shards, rows and failures to callbacks on the driver's thread. It holds no more than it
was given: the window itself is the caller's (RayStage, or `embed_on_ray`).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esm2_batch.embedding.budget import sized
from esm2_batch.embedding.embed import embed_rows
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.errors import ModelError
from esm2_batch.run.ray_cluster import RayOptions, actor_resources, connect
from esm2_batch.store.residues import SHARD_SUFFIX, ResidueWriter, ShardBuffer, ShardEntries

Item = tuple[str, str, str]
"""(key, name, sequence): one distinct sequence to embed."""
RowCallback = Callable[[list[str], torch.Tensor], None]
FailureCallback = Callable[[str, str, str], None]
ShardCallback = Callable[[str, ShardEntries], None]


@dataclass(frozen=True)
class ShardTarget:
    """Where actors write per_tok shards: the residue store's directory (absolute, as the
    driver sees it; `check_shared_directory` made sure the workers see the same), its
    layers, whether shards keep the pooled rows (FASTA mode) and the shard size."""

    directory: str
    layers: tuple[int, ...]
    keep_rows: bool
    shard_bytes: int

    @classmethod
    def of(cls, writer: ResidueWriter) -> ShardTarget:
        return cls(str(writer.directory.resolve()), tuple(writer.layers), writer.keep_rows,
                   writer.shard_bytes)


class EmbedActor:
    """A Ray actor: loads the model once, embeds tasks of (key, name, sequence) under the
    token budget and returns float32 rows (what the in-process stage hands its sink).
    With `shards` (per_tok) it writes the states into the residue store itself, a shard
    per task (or per `shard_bytes`), and returns each row's shard name and state length.
    Every reply names the actor (`tag`, new with every start): a restarted actor is a
    new tag, so the driver can count model loads. A "auto" budget is sized here, on the
    actor's own device (embed_rows sizes it), and every reply says what it became."""

    def __init__(self, model: str, options: RayOptions, embed: EmbedOptions,
                 threads: int, shards: ShardTarget | None = None) -> None:
        from esm2_batch.models import load_model

        torch.set_num_threads(max(1, threads))
        self.model = load_model(model, device=options.device, engine=options.engine,
                                backend=options.backend, dtype=options.dtype)
        self.embed_options = embed
        self.shards = shards
        self.tag = uuid.uuid4().hex[:12]  # unique per actor: shard names never collide
        self.written = 0

    def ready(self) -> str:
        """Answers once the model is loaded (the driver's start check)."""
        return self.tag

    def embed(self, items: list[Item]) -> dict[str, Any]:
        keys = [key for key, _, _ in items]
        model = self.model
        matrices = self.embed_options.matrices(name=model.name, num_layers=model.num_layers)
        emb = np.zeros((len(items), len(matrices) * model.embed_dim), dtype=np.float32)
        errors = [""] * len(items)
        shard_of = [""] * len(items)
        lengths = [0] * len(items)
        target = self.shards
        buffer = None if target is None else ShardBuffer(target.layers,
                                                         keep_rows=target.keep_rows)
        named = [(name, seq) for _, name, seq in items]
        for result in embed_rows(model, named, self.embed_options):
            i = result.index
            if result.packed is None:
                errors[i] = str(result.error)
                continue
            # every (layer, pooler) side by side, as the in-process stage packs them
            emb[i] = result.packed.to(torch.float32).numpy()
            if buffer is not None and target is not None:
                lengths[i] = buffer.add(keys[i], named[i][0], result.residues, result.packed)
                if buffer.size >= target.shard_bytes:
                    self._write(buffer, target, keys, shard_of)
                    buffer = ShardBuffer(target.layers, keep_rows=target.keep_rows)
        if buffer is not None and target is not None and buffer.entries:
            self._write(buffer, target, keys, shard_of)
        return {"emb": emb, "error": errors, "shard": shard_of, "length": lengths,
                "actor": self.tag,
                "budget": sized(self.embed_options, model).toks_per_batch}

    def _write(self, buffer: ShardBuffer, target: ShardTarget, keys: list[str],
               shard_of: list[str]) -> None:
        """Write a full shard (durable before the driver can name it) and note its rows."""
        name = f"ray-{self.tag}-{self.written:06d}{SHARD_SUFFIX}"
        buffer.write(Path(target.directory) / name)
        self.written += 1
        for i, key in enumerate(keys):
            if key in buffer.entries:
                shard_of[i] = name


@dataclass
class RayStats:
    """What a run did on the cluster. `wall_s` counts the seconds with a task in flight;
    `instances` the actor starts that answered (one model load each)."""

    rows: int = 0
    failed: int = 0
    wall_s: float = 0.0
    actors: int = 0
    windows: int = 0
    tasks: int = 0
    instances: set[str] = field(default_factory=set)
    budgets: dict[str, int] = field(default_factory=dict)  # actor tag -> its tokens/batch


class ActorPool:
    """Persistent actors fed with a bounded number of tasks; rows, shards and failures
    go to the callbacks as tasks finish (on the calling thread, one at a time)."""

    def __init__(self, ray: Any, *, model: str, options: RayOptions, embed: EmbedOptions,
                 on_rows: RowCallback, on_failure: FailureCallback,
                 shards: ShardTarget | None = None,
                 on_shard: ShardCallback | None = None) -> None:
        self.ray, self.model, self.options, self.embed = ray, model, options, embed
        self.on_rows, self.on_failure = on_rows, on_failure
        self.shards, self.on_shard = shards, on_shard
        self.planned, self.reserve = actor_resources(ray, options)
        self.window = max(options.window_rows,
                          self.planned * options.tasks_per_actor * options.rows_per_task)
        self.stats = RayStats()
        self.actors: list[Any] = []
        self.load: list[int] = []  # tasks in flight per actor
        self.ready: deque[list[Item]] = deque()  # cut, not yet sent
        self.queued = 0  # sequences in `ready`
        self.in_flight: dict[Any, tuple[int, list[Item]]] = {}
        self.starting: dict[Any, int] = {}  # actors whose model is not loaded yet
        self.deadline = 0.0
        self._busy_since: float | None = None

    def room(self) -> bool:
        """Whether an actor could take a task now (the pool not started counts as room)."""
        if not self.actors:
            return True
        return any(n < self.options.tasks_per_actor for n in self.load)

    def add_window(self, items: Sequence[Item]) -> None:
        """Sort a window by length and cut it into tasks (longest first: the slowest
        tasks start first, the short ones fill in at the end)."""
        if not items:
            return
        ordered = sorted(items, key=lambda item: -len(item[2]))
        size = self.options.rows_per_task
        self.ready.extend(ordered[i:i + size] for i in range(0, len(ordered), size))
        self.queued += len(ordered)
        self.stats.windows += 1

    def busy(self) -> bool:
        return bool(self.ready or self.in_flight)

    def pump(self, *, block: bool, final: bool = False) -> None:
        """Send what the actors have room for and take every finished task; with `block`
        wait for at least one first (when anything is in flight). `final`: no more input,
        so the pool need not start more actors than there are tasks."""
        self._send(final)
        self._check_started()
        if block and self.in_flight:
            self._wait()
        if self.in_flight:
            done, _ = self.ray.wait(list(self.in_flight), num_returns=len(self.in_flight),
                                    timeout=0)
            for ref in done:
                self._take(ref)
        self._send(final)

    def drain(self) -> None:
        while self.busy():
            self.pump(block=True, final=True)

    def close(self) -> None:
        """Stop the actors (a joined cluster gets its resources back)."""
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors, self.load, self.in_flight, self.starting = [], [], {}, {}

    def _start(self, final: bool) -> None:
        count = min(self.planned, len(self.ready)) if final else self.planned
        threads = int(self.reserve.get("num_cpus", 1)) or 1
        remote = self.ray.remote(EmbedActor).options(
            max_restarts=-1, max_task_retries=self.options.max_task_retries, **self.reserve)
        self.actors = [remote.remote(self.model, self.options, self.embed, threads,
                                     self.shards) for _ in range(count)]
        self.load = [0] * count
        self.starting = {actor.ready.remote(): i for i, actor in enumerate(self.actors)}
        self.deadline = time.monotonic() + self.options.start_timeout_s
        self.stats.actors = count

    def _send(self, final: bool) -> None:
        while self.ready:
            if not self.actors:
                self._start(final)
            i = min(range(len(self.actors)), key=self.load.__getitem__)
            if self.load[i] >= self.options.tasks_per_actor:
                return
            task = self.ready.popleft()
            self.queued -= len(task)
            self.in_flight[self.actors[i].embed.remote(task)] = (i, task)
            self.load[i] += 1
            self.stats.tasks += 1
            if self._busy_since is None:
                self._busy_since = time.perf_counter()

    def _wait(self) -> None:
        """Until a task finishes; while actors are starting, no longer than their start
        deadline (an actor the cluster cannot place never answers)."""
        while True:
            self._check_started()
            timeout = None if not self.starting else max(0.0, self.deadline - time.monotonic())
            done, _ = self.ray.wait([*self.in_flight, *self.starting], num_returns=1,
                                    timeout=timeout)
            if any(ref in self.in_flight for ref in done) or not self.in_flight:
                return

    def _check_started(self) -> None:
        if not self.starting:
            return
        done, _ = self.ray.wait(list(self.starting), num_returns=len(self.starting),
                                timeout=0)
        for ref in done:
            del self.starting[ref]
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:
                raise ModelError(f"the Ray actors could not load the model {self.model!r}: "
                                 f"{_cause(exc)}") from exc
        if self.starting and time.monotonic() >= self.deadline:
            resources = ", ".join(f"{k.removeprefix('num_')}={v:g}"
                                  for k, v in self.reserve.items())
            raise ModelError(
                f"{len(self.starting)} of {len(self.actors)} Ray actors did not start "
                f"within {self.options.start_timeout_s:.0f} s: the cluster lacks what each "
                f"reserves ({resources}) or loading the model takes longer; use fewer "
                "--ray_actors or a larger cluster")

    def _started(self, actor: int) -> None:
        """Wait (until the start deadline) for `actor`'s start check, raising if it failed."""
        check = [ref for ref, i in self.starting.items() if i == actor]
        if check:
            self.ray.wait(check, timeout=max(0.0, self.deadline - time.monotonic()))
            self._check_started()

    def _take(self, ref: Any) -> None:
        actor, task = self.in_flight.pop(ref)
        self.load[actor] -= 1
        if not self.in_flight and self._busy_since is not None:
            self.stats.wall_s += time.perf_counter() - self._busy_since
            self._busy_since = None
        try:
            reply = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._started(actor)  # an actor that never loaded the model is a ModelError
            error = (f"its Ray actor died on each of {self.options.max_task_retries + 1} "
                     f"tries: {_cause(exc)}")
            for key, name, _ in task:
                self.on_failure(key, name, error)
            self.stats.failed += len(task)
            return
        self.stats.instances.add(str(reply["actor"]))
        if "budget" in reply:
            self.stats.budgets[str(reply["actor"])] = int(reply["budget"])
        self._consume(task, reply)

    def _consume(self, task: list[Item], reply: dict[str, Any]) -> None:
        errors: list[str] = reply["error"]
        ok = [i for i, error in enumerate(errors) if not error]
        for i in (i for i, error in enumerate(errors) if error):
            self.on_failure(task[i][0], task[i][1], errors[i])
            self.stats.failed += 1
        if not ok:
            return
        if self.on_shard is not None:  # states named first: a stored row has its states
            named: dict[str, dict[str, tuple[str, int]]] = {}
            for i in ok:
                named.setdefault(reply["shard"][i], {})[task[i][0]] = (
                    task[i][1], int(reply["length"][i]))
            for shard, entries in named.items():
                self.on_shard(shard, entries)
        rows = torch.from_numpy(np.ascontiguousarray(reply["emb"][ok]))
        self.on_rows([task[i][0] for i in ok], rows)
        self.stats.rows += len(ok)


def _cause(exc: BaseException) -> str:
    """One line for an actor's death. Ray's message spans many lines: when the
    constructor raised, a traceback whose last line is the error itself ("module.Type:
    message", the message kept); otherwise the reason, last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    if getattr(exc, "actor_init_failed", False) and ": " in last:
        return last.split(": ", 1)[1]
    return last


def embed_on_ray(items: Sequence[Item], *, model: str, options: RayOptions,
                 embed: EmbedOptions, on_rows: RowCallback, on_failure: FailureCallback,
                 shards: ShardTarget | None = None,
                 on_shard: ShardCallback | None = None) -> RayStats:
    """Embed (key, name, sequence) items on Ray, window by window; rows and failures go
    to the sinks. With `shards` (per_tok) the actors write the states there, and each
    finished shard goes to `on_shard` (name, key -> (protein id, length)) before its rows
    go to `on_rows`. (The benchmarks' entry point; runs use RayStage.)"""
    if not items:
        return RayStats()
    pool = ActorPool(connect(options), model=model, options=options, embed=embed,
                     on_rows=on_rows, on_failure=on_failure, shards=shards,
                     on_shard=on_shard if shards else None)
    try:
        for start in range(0, len(items), pool.window):
            pool.add_window(items[start:start + pool.window])
            final = start + pool.window >= len(items)
            while pool.queued >= pool.window:
                pool.pump(block=True, final=final)
        pool.drain()
    finally:
        pool.close()
    return pool.stats
