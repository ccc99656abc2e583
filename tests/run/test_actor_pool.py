"""ActorPool's bookkeeping with a stand-in for the ray module (no cluster, milliseconds):
tasks in flight per actor stay bounded, and a task whose actor keeps dying has its
sequences recorded as failed by key while the other tasks' rows are stored.

(The real actors, restarts and start guards are test_ray_window.py's, on a local cluster.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.run.ray_actors import ActorPool
from esm2_batch.run.ray_cluster import RayOptions


class ActorDied(Exception):
    """Stands in for ray.exceptions.RayActorError."""


class Ref:
    def __init__(self, actor: int = 0, value: Any = None,
                 error: BaseException | None = None) -> None:
        self.actor, self.value, self.error = actor, value, error


class FakeRay:
    """Actors answer at once; a task holding a key in `deadly` kills its actor on every
    try (Ray would restart it and retry, then raise RayActorError from get)."""

    class exceptions:  # the module's attribute name
        RayActorError = ActorDied

    def __init__(self, deadly: set[str]) -> None:
        self.deadly = deadly
        self.unresolved: list[int] = []  # tasks in flight per actor, seen at each send
        self.in_flight: dict[int, int] = {}
        self.killed = 0

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 4.0}

    def remote(self, cls: type) -> Any:
        fake = self

        class Handle:
            def __init__(self, index: int) -> None:
                self.index = index
                self.ready = Method(lambda: Ref(value="tag"))
                self.embed = Method(lambda task: fake.send(self.index, task))

        class Method:
            def __init__(self, call: Any) -> None:
                self.remote = call

        class ActorClass:
            count = 0

            def options(self, **kwargs: Any) -> ActorClass:
                assert kwargs["max_restarts"] == -1 and kwargs["max_task_retries"] == 3
                return self

            def remote(self, *args: Any) -> Handle:
                ActorClass.count += 1
                return Handle(ActorClass.count)

        return ActorClass()

    def send(self, actor: int, task: list[tuple[str, str, str]]) -> Ref:
        self.in_flight[actor] = self.in_flight.get(actor, 0) + 1
        self.unresolved.append(self.in_flight[actor])
        if any(key in self.deadly for key, _, _ in task):
            return Ref(actor, error=ActorDied("The actor died unexpectedly.\n\tkilled (OOM)"))
        n = len(task)
        return Ref(actor, {"emb": np.ones((n, 4), dtype=np.float32), "error": [""] * n,
                    "shard": [""] * n, "length": [0] * n, "actor": f"actor{actor}"})

    def wait(self, refs: list[Ref], num_returns: int = 1,
             timeout: float | None = None) -> tuple[list[Ref], list[Ref]]:
        return list(refs)[:num_returns], list(refs)[num_returns:]

    def get(self, ref: Ref) -> Any:
        if ref.actor:  # a task's answer taken: its actor has room again
            self.in_flight[ref.actor] -= 1
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, actor: Any, no_restart: bool) -> None:
        self.killed += 1


def test_a_task_that_keeps_killing_its_actor_is_recorded_as_failed_by_key() -> None:
    ray = FakeRay(deadly={"k13"})
    stored: dict[str, torch.Tensor] = {}
    failed: dict[str, tuple[str, str]] = {}
    options = RayOptions(actors=2, device="cpu", rows_per_task=4, window_rows=8)
    pool = ActorPool(ray, model="m", options=options, embed=EmbedOptions(),
                     on_rows=lambda keys, rows: stored.update(zip(keys, rows, strict=True)),
                     on_failure=lambda key, name, error: failed.update({key: (name, error)}))
    items = [(f"k{i}", f"p{i}", "M" * (5 + i % 7)) for i in range(40)]
    for start in range(0, 40, 8):
        pool.add_window(items[start:start + 8])
        pool.pump(block=False)
    pool.drain()
    pool.close()
    assert len(failed) == 4 and "k13" in failed  # its whole task of 4
    name, error = failed["k13"]
    assert name == "p13"
    assert error == "its Ray actor died on each of 4 tries: killed (OOM)"
    assert sorted(stored) == sorted(k for k, _, _ in items if k not in failed)
    assert pool.stats.actors == 2 and ray.killed == 2
    assert max(ray.unresolved) <= options.tasks_per_actor  # per actor, never more
