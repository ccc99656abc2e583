"""The embedding stage on a Ray cluster (optional extra `[ray]`): `RayStage` implements
run/stages.py's EmbedStage protocol, so gene mode and FASTA mode run on Ray unchanged.

Why Ray Data rather than a home-made scheduler: it already places actors on GPUs,
restarts dead ones, and streams results back with backpressure. What stays ours:

- Fetching stays one rate-limited client on the driver (Ensembl's limit is per IP).
- Sequences are sorted by length on the driver and cut into row batches of similar
  length; each actor (one model load, `num_gpus=1`, or a share of the CPUs) packs its
  rows into token-budget batches with `iter_embeddings`, as the single-process path.
- Actors return float32 rows, as the in-process stage does (the sink decides what it
  stores); the driver consumes them with `iter_batches` and writes them
  through the project's resumable store (atomic chunks), so resume, atomicity and
  ordering stay one mechanism (Ray's write_parquet is neither atomic nor idempotent).
- per_tok: [L, dim] states per protein are ~1,000x a pooled row, too much to ship through
  the driver. So each actor writes its states itself, as residue-store shards
  (store.residues.ShardBuffer, atomic and fsynced) straight into the store directory,
  under names unique to the actor (`ray-<actor>-<n>.safetensors`: actors never collide),
  and returns only the rows plus, per sequence, its shard and length. The driver, the
  index's one writer, names each finished shard (`ResidueWriter.adopt`) before it hands
  the rows to the sink, so crash safety and resume are the in-process store's: kill -9
  loses at most shards no index names yet, which are debris removed on the next open.
  That needs a directory every node shares: before any work, `check_shared_directory`
  writes a probe with a random token there and a task on every node that can host an
  actor reads it back; a node that cannot is one InputError line, not a run that
  embeds for an hour and then finds its shards missing. `--ray local` shares trivially
  and still goes through the check (one code path).
- `--ray local` starts a one-machine cluster listening on 127.0.0.1 only, with Ray's token
  authentication off (nothing off this machine can reach it); joining an existing cluster
  uses the user's own Ray settings untouched.
- Guards instead of hangs: asking for GPUs on a cluster without any, and an actor pool
  that cannot start (`wait_for_min_actors_s`), are errors, not silent waits.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esm2_batch.embedding.embed import embed_rows
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.errors import InputError, ModelError, first_line
from esm2_batch.models import Engine, LoadedModel
from esm2_batch.run.stages import Named, PendingSequences, ResidueSink, RowSink, StageOptions
from esm2_batch.store.atomic import atomic_text
from esm2_batch.store.keys import RowKeys
from esm2_batch.store.residues import SHARD_SUFFIX, ResidueWriter, ShardBuffer, ShardEntries

log = logging.getLogger("esm2_batch.ray")

RowCallback = Callable[[list[str], torch.Tensor], None]
FailureCallback = Callable[[str, str, str], None]
ShardCallback = Callable[[str, ShardEntries], None]

PROBE_PREFIX = ".ray-probe-"
"""The shared-filesystem probe's name in the store directory (debris if a crash leaves
it: the residue store removes files its index does not name on open)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how to run: `address` is "local", "auto" or a cluster address."""

    address: str = "local"
    actors: int | None = None
    device: str | None = None
    engine: Engine = "fast"
    backend: str = "auto"
    dtype: str | None = None  # the driver's compute dtype, so meta is true of every row
    rows_per_task: int = 64
    local_cpus: int | None = None
    start_timeout_s: float = 120.0


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise InputError("--ray needs Ray Data: pip install 'esm2-batch[ray]'") from exc
    return ray


def connect(options: RayOptions) -> Any:
    """Start or join a cluster; a clear error when it cannot be reached."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        if options.address == "local":
            _start_local(ray, options)
        else:
            address = None if options.address == "auto" else options.address
            ray.init(address=address or "auto", log_to_driver=False,
                     configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"cannot reach the Ray cluster at {options.address!r} "
                         f"({first_line(exc)}); start one with 'ray start --head' "
                         "or use --ray local") from exc
    return ray


def _start_local(ray: Any, options: RayOptions) -> None:
    """A cluster of this process alone: bound to loopback, so token authentication (which
    a fresh machine has no token for) can be off; a user's own RAY_AUTH_MODE wins."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=options.local_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")


def check_cluster(options: RayOptions) -> tuple[int, dict[str, float]]:
    """Connect and size the actor pool; called before fetching so errors come first."""
    return actor_resources(connect(options), options)


def actor_resources(ray: Any, options: RayOptions) -> tuple[int, dict[str, float]]:
    """How many actors and what each reserves; GPUs asked of a GPU-less cluster fail."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if options.device == "cuda" or (options.device is None and gpus > 0):
        if gpus == 0:
            raise ModelError("--device cuda with --ray: the Ray cluster has no GPU; use "
                             "--device cpu or join a cluster with GPUs")
        return options.actors or gpus, {"num_gpus": 1}
    actors = options.actors or max(1, int(cpus // 2))
    # Leave headroom: actors reserving every CPU stall Ray Data's own tasks.
    return actors, {"num_cpus": max(0.5, min(2.0, (cpus - 0.5) / actors))}


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
    """A Ray actor: loads the model once, embeds row batches under the token budget and
    returns float32 rows (what the in-process stage hands its sink). With `shards`
    (per_tok) it writes the states into the residue store itself, a shard per batch (or
    per `shard_bytes`), and returns each row's shard name and state length instead."""

    def __init__(self, model: str, options: RayOptions, embed: EmbedOptions,
                 threads: int, shards: ShardTarget | None = None) -> None:
        from esm2_batch.models import load_model

        torch.set_num_threads(max(1, threads))
        self.model = load_model(model, device=options.device, engine=options.engine,
                                backend=options.backend, dtype=options.dtype)
        self.embed = embed
        self.shards = shards
        self.tag = uuid.uuid4().hex[:12]  # unique per actor: shard names never collide
        self.written = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys, names, seqs = list(batch["key"]), list(batch["name"]), list(batch["seq"])
        model = self.model
        matrices = self.embed.matrices(name=model.name, num_layers=model.num_layers)
        emb = np.zeros((len(seqs), len(matrices) * model.embed_dim), dtype=np.float32)
        errors = [""] * len(seqs)
        shard_of = [""] * len(seqs)
        lengths = np.zeros(len(seqs), dtype=np.int64)
        target = self.shards
        buffer = None if target is None else ShardBuffer(target.layers,
                                                         keep_rows=target.keep_rows)
        for result in embed_rows(model, list(zip(names, seqs, strict=True)), self.embed):
            i = result.index
            if result.packed is None:
                errors[i] = str(result.error)
                continue
            # every (layer, pooler) side by side, as the in-process stage packs them
            emb[i] = result.packed.to(torch.float32).numpy()
            if buffer is not None and target is not None:
                lengths[i] = buffer.add(str(keys[i]), str(names[i]), result.residues,
                                        result.packed)
                if buffer.size >= target.shard_bytes:
                    self._write(buffer, target, keys, shard_of)
                    buffer = ShardBuffer(target.layers, keep_rows=target.keep_rows)
        if buffer is not None and target is not None and buffer.entries:
            self._write(buffer, target, keys, shard_of)
        return {"key": batch["key"], "name": batch["name"], "emb": emb,
                "error": np.array(errors, dtype=object),
                "shard": np.array(shard_of, dtype=object), "length": lengths}

    def _write(self, buffer: ShardBuffer, target: ShardTarget, keys: list[str],
               shard_of: list[str]) -> None:
        """Write a full shard (durable before the driver can name it) and note its rows."""
        name = f"ray-{self.tag}-{self.written:06d}{SHARD_SUFFIX}"
        buffer.write(Path(target.directory) / name)
        self.written += 1
        for i, key in enumerate(keys):
            if str(key) in buffer.entries:
                shard_of[i] = name


def read_probe(path: str, *, tries: int = 3, pause_s: float = 0.2) -> str | None:
    """What a worker reads at `path` (None: nothing there). A few tries, since a network
    mount may show a file a moment after another node wrote it. Self-contained (imports
    inside): shipped to the workers by value, so a probe task loads nothing of ours,
    not torch (seconds per fresh worker)."""
    import time as clock
    from pathlib import Path as WorkerPath

    for attempt in range(tries):
        try:
            return WorkerPath(path).read_text(encoding="utf-8")
        except OSError:
            if attempt + 1 < tries:
                clock.sleep(pause_s)
    return None


def _by_value(function: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of a module-level function that pickles by value (cloudpickle pickles a
    function it can import by reference, and the worker would import its module)."""
    import types

    copy = types.FunctionType(function.__code__, {"__builtins__": __builtins__},
                              name=function.__name__, argdefs=function.__defaults__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = f"{function.__qualname__}.<by value>"
    return copy


def _write_probe(path: Path, token: str) -> None:
    """The driver's probe, written atomically (a worker never reads half a token)."""
    atomic_text(path, token)


def check_shared_directory(ray: Any, directory: Path, reserve: dict[str, float],
                           timeout_s: float) -> None:
    """per_tok's actors write shards into `directory`: fail now, in one line, unless
    every node that can host an actor (`reserve`: its GPU or CPU) reads the probe the
    driver wrote there, with the driver's random token. The probe is removed after."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(16)
    probe = directory.resolve() / f"{PROBE_PREFIX}{token}"
    wanted = "GPU" if reserve.get("num_gpus") else "CPU"
    nodes = [node["NodeID"] for node in ray.nodes()
             if node.get("Alive") and node.get("Resources", {}).get(wanted, 0) > 0]
    reader = ray.remote(_by_value(read_probe))
    advice = "put --out on a filesystem every node mounts, or drop --ray"
    _write_probe(probe, token)
    try:
        tasks = [reader.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(str(probe)) for node in nodes]
        seen = ray.get(tasks, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise InputError(f"--include per_tok with --ray: could not check that {directory} "
                         f"is shared: the cluster's workers did not answer within "
                         f"{timeout_s:.0f} s; {advice}") from exc
    finally:
        probe.unlink(missing_ok=True)
    if any(text != token for text in seen):
        raise InputError(f"--include per_tok with --ray: {directory} is not visible to the "
                         f"cluster's workers (no shared filesystem); {advice}")


@dataclass
class RayStats:
    rows: int = 0
    failed: int = 0
    wall_s: float = 0.0
    actors: int = 0


def embed_on_ray(items: Sequence[tuple[str, str, str]], *, model: str, options: RayOptions,
                 embed: EmbedOptions, on_rows: RowCallback, on_failure: FailureCallback,
                 shards: ShardTarget | None = None,
                 on_shard: ShardCallback | None = None) -> RayStats:
    """Embed (key, name, sequence) items on Ray; rows and failures go to the sinks. With
    `shards` (per_tok) the actors write the states there, and each finished shard goes to
    `on_shard` (name, key -> (protein id, length)) before its rows go to `on_rows`."""
    stats = RayStats()
    if not items:
        return stats
    ray = connect(options)
    actors, reserve = actor_resources(ray, options)
    blocks = -(-len(items) // options.rows_per_task)
    actors = min(actors, blocks)  # an idle actor would only hold resources
    stats.actors = actors
    context = ray.data.DataContext.get_current()
    context.wait_for_min_actors_s = options.start_timeout_s
    ordered = sorted(items, key=lambda item: -len(item[2]))  # similar lengths together
    dataset = ray.data.from_items([{"key": k, "name": n, "seq": s} for k, n, s in ordered],
                                  override_num_blocks=blocks)
    threads = int(reserve.get("num_cpus", 1)) or 1
    embedded = dataset.map_batches(
        EmbedActor, batch_size=options.rows_per_task, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"model": model, "options": options, "embed": embed,
                               "threads": threads, "shards": shards},
        **reserve)
    start = time.perf_counter()
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        _consume(batch, on_rows, on_failure, stats, on_shard if shards else None)
    stats.wall_s = time.perf_counter() - start
    return stats


def _consume(batch: dict[str, np.ndarray], on_rows: RowCallback, on_failure: FailureCallback,
             stats: RayStats, on_shard: ShardCallback | None = None) -> None:
    ok = [i for i, error in enumerate(batch["error"]) if not error]
    for i in (i for i, error in enumerate(batch["error"]) if error):
        on_failure(str(batch["key"][i]), str(batch["name"][i]), str(batch["error"][i]))
        stats.failed += 1
    if ok and on_shard is not None:  # states named first: a stored row has its states
        named: dict[str, dict[str, tuple[str, int]]] = {}
        for i in ok:
            named.setdefault(str(batch["shard"][i]), {})[str(batch["key"][i])] = (
                str(batch["name"][i]), int(batch["length"][i]))
        for shard, entries in named.items():
            on_shard(shard, entries)
    if ok:
        rows = torch.from_numpy(np.ascontiguousarray(batch["emb"][ok]))
        on_rows([str(batch["key"][i]) for i in ok], rows)
        stats.rows += len(ok)


def shutdown() -> None:
    """Stop a cluster this process started (a joined cluster keeps running)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


class RayStage(PendingSequences):
    """The embedding stage on Ray: sequences are collected while the driver fetches, then
    the distinct pending ones run on Ray actors and stream back into the sink. With
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
        self.stats: RayStats | None = None

    def start(self) -> None:
        """Join the cluster and check its resources now, before any fetching; with
        per_tok also that every node sees the residue store's directory."""
        _, reserve = check_cluster(self.ray)
        if self.residues is not None:
            check_shared_directory(connect(self.ray), self.residues.directory, reserve,
                                   self.ray.start_timeout_s)

    def submit(self, items: Sequence[Named]) -> None:
        self._add(items)

    def full(self) -> bool:
        return False

    def wait_for_room(self) -> None:
        """Never full: sequences wait in memory until finish()."""

    def raise_error(self) -> None:
        """Errors surface from finish() directly."""

    def stop(self) -> None:
        self._bar.close()

    def finish(self) -> None:
        pending = self._take_pending()
        lengths = {key: len(seq) for key, (_, seq) in pending}

        def on_rows(keys: list[str], rows: torch.Tensor) -> None:
            self._persist(keys, rows, [lengths[k] for k in keys])

        def on_failure(key: str, name: str, error: str) -> None:
            self._fail(key, name, error, lengths[key])

        writer = self.residues
        self.stats = embed_on_ray([(key, name, seq) for key, (name, seq) in pending],
                                  model=self.model_source, options=self.ray,
                                  embed=self.options, on_rows=on_rows, on_failure=on_failure,
                                  shards=None if writer is None else ShardTarget.of(writer),
                                  on_shard=None if writer is None else writer.adopt)
        self.busy_s = self.stats.wall_s


def portable_model(model: str) -> str:
    """A checkpoint path made absolute, since Ray workers may run elsewhere."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
