"""Reaching a Ray cluster and checking it can run the embedding stage (run/ray_stage.py).

Everything here happens before any sequence is embedded, so what would otherwise fail an
hour into a run fails first, in one line:

- `--ray local` starts a one-machine cluster listening on 127.0.0.1 only, with Ray's token
  authentication off (nothing off this machine can reach it); joining an existing cluster
  uses the user's own Ray settings untouched. A cluster that cannot be reached is an
  InputError naming the address.
- Asking for GPUs on a cluster without any is a ModelError, not actors waiting forever.
- per_tok: the actors write residue shards into the store directory, which needs a
  directory every node shares. `check_shared_directory` writes a probe with a random token
  there and a task on every node that can host an actor reads it back; a node that cannot
  is one InputError line, not a run that embeds for an hour and then finds its shards
  missing. `--ray local` shares trivially and still goes through the check (one path).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esm2_batch.errors import InputError, ModelError, first_line
from esm2_batch.models import Engine
from esm2_batch.store.atomic import atomic_text

PROBE_PREFIX = ".ray-probe-"
"""The shared-filesystem probe's name in the store directory (debris if a crash leaves
it: the residue store removes files its index does not name on open)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how to run: `address` is "local", "auto" or a cluster address.

    How the driver feeds the actors (run/ray_stage.py), all in sequences: it gathers
    `window_rows` distinct sequences, sorts them by length and cuts them into tasks of
    `rows_per_task`; each actor has at most `tasks_per_actor` tasks in flight (one
    running, one queued, so it never idles for a round trip to the driver). A task whose
    actor dies is retried `max_task_retries` times on the restarted actor, then its
    sequences are recorded as failed."""

    address: str = "local"
    actors: int | None = None
    device: str | None = None
    engine: Engine = "fast"
    backend: str = "auto"
    dtype: str | None = None  # the driver's compute dtype, so meta is true of every row
    rows_per_task: int = 64
    window_rows: int = 1024
    tasks_per_actor: int = 2
    max_task_retries: int = 3
    local_cpus: int | None = None
    start_timeout_s: float = 120.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InputError("--ray needs Ray: pip install 'esm2-batch[ray]'") from exc
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


LOCAL_ENVIRONMENT = {"RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"}
"""What a local cluster of this process alone runs with. Bound to loopback, so token
authentication (which a fresh machine has no token for) can be off. Workers at the
driver's priority: Ray starts them at nice 15, so on a machine with any other busy
process the embedding actors get a few percent of a core (measured: an actor importing
torch at 4% CPU beside two busy loops) and `--ray local` crawls where the single-process
run does not."""


def local_environment() -> None:
    """Set LOCAL_ENVIRONMENT before a local cluster starts (its processes inherit it);
    a user's own setting of either variable wins."""
    for name, value in LOCAL_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def _start_local(ray: Any, options: RayOptions) -> None:
    """A cluster of this process alone, on loopback (LOCAL_ENVIRONMENT)."""
    local_environment()
    ray.init(num_cpus=options.local_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")


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
    # Leave headroom for the driver (fetching, store writes), often on the same machine.
    return actors, {"num_cpus": max(0.5, min(2.0, (cpus - 0.5) / actors))}


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


def shutdown() -> None:
    """Stop a cluster this process started (a joined cluster keeps running)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()



def portable_model(model: str) -> str:
    """A checkpoint path made absolute, since Ray workers may run elsewhere."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
