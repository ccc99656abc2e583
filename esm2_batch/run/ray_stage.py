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
- `--ray local` starts a one-machine cluster listening on 127.0.0.1 only, with Ray's token
  authentication off (nothing off this machine can reach it); joining an existing cluster
  uses the user's own Ray settings untouched.
- Guards instead of hangs: asking for GPUs on a cluster without any, and an actor pool
  that cannot start (`wait_for_min_actors_s`), are errors, not silent waits.
"""

from __future__ import annotations

import logging
import os
import time
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
from esm2_batch.run.stages import Named, PendingSequences, RowSink, StageOptions
from esm2_batch.store.keys import RowKeys

log = logging.getLogger("esm2_batch.ray")

RowCallback = Callable[[list[str], torch.Tensor], None]
FailureCallback = Callable[[str, str, str], None]


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


class EmbedActor:
    """A Ray actor: loads the model once, embeds row batches under the token budget and
    returns float32 rows (what the in-process stage hands its sink)."""

    def __init__(self, model: str, options: RayOptions, embed: EmbedOptions,
                 threads: int) -> None:
        from esm2_batch.models import load_model

        torch.set_num_threads(max(1, threads))
        self.model = load_model(model, device=options.device, engine=options.engine,
                                backend=options.backend, dtype=options.dtype)
        self.embed = embed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, seqs = list(batch["name"]), list(batch["seq"])
        model = self.model
        matrices = self.embed.matrices(name=model.name, num_layers=model.num_layers)
        emb = np.zeros((len(seqs), len(matrices) * model.embed_dim), dtype=np.float32)
        errors = [""] * len(seqs)
        for result in embed_rows(model, list(zip(names, seqs, strict=True)), self.embed):
            if result.packed is None:
                errors[result.index] = str(result.error)
            else:  # every (layer, pooler) side by side, as the in-process stage packs them
                emb[result.index] = result.packed.to(torch.float32).numpy()
        return {"key": batch["key"], "name": batch["name"], "emb": emb,
                "error": np.array(errors, dtype=object)}


@dataclass
class RayStats:
    rows: int = 0
    failed: int = 0
    wall_s: float = 0.0
    actors: int = 0


def embed_on_ray(items: Sequence[tuple[str, str, str]], *, model: str, options: RayOptions,
                 embed: EmbedOptions, on_rows: RowCallback,
                 on_failure: FailureCallback) -> RayStats:
    """Embed (key, name, sequence) items on Ray; rows and failures go to the sinks."""
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
                               "threads": threads},
        **reserve)
    start = time.perf_counter()
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        _consume(batch, on_rows, on_failure, stats)
    stats.wall_s = time.perf_counter() - start
    return stats


def _consume(batch: dict[str, np.ndarray], on_rows: RowCallback, on_failure: FailureCallback,
             stats: RayStats) -> None:
    ok = [i for i, error in enumerate(batch["error"]) if not error]
    for i in (i for i, error in enumerate(batch["error"]) if error):
        on_failure(str(batch["key"][i]), str(batch["name"][i]), str(batch["error"][i]))
        stats.failed += 1
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
    the distinct pending ones run on Ray actors and stream back into the sink."""

    def __init__(self, model: LoadedModel, sink: RowSink, options: EmbedOptions,
                 stage: StageOptions, *, keys: RowKeys, model_source: str,
                 device: str | None) -> None:
        super().__init__(model, sink, options, keys=keys, progress=stage.progress)
        self.ray = RayOptions(address=stage.ray or "local", actors=stage.ray_actors,
                              device=device, engine=model.engine,
                              backend=model.backend,
                              dtype=str(model.dtype).removeprefix("torch."))
        self.model_source = portable_model(model_source)
        self.stats: RayStats | None = None

    def start(self) -> None:
        """Join the cluster and check its resources now, before any fetching."""
        check_cluster(self.ray)

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

        self.stats = embed_on_ray([(key, name, seq) for key, (name, seq) in pending],
                                  model=self.model_source, options=self.ray,
                                  embed=self.options, on_rows=on_rows, on_failure=on_failure)
        self.busy_s = self.stats.wall_s


def portable_model(model: str) -> str:
    """A checkpoint path made absolute, since Ray workers may run elsewhere."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
