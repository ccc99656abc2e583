"""The Ray stage feeds its actors a bounded window while the driver fetches: what the
driver holds does not grow with the input, the actors load the model once per run (not
once per window), a dead actor is restarted and its task retried, and actors that cannot
start or cannot load the model are a ModelError, not a hang.

Marked `ray`, one local cluster for the module (each actor start costs seconds)."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.errors import ModelError
from esm2_batch.models import LoadedModel
from esm2_batch.run import ray_actors, ray_stage
from esm2_batch.run.ray_stage import RayOptions, RayStage, embed_on_ray
from esm2_batch.run.stages import MemorySink, StageOptions
from esm2_batch.store.keys import RowKeys

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

ROWS_PER_TASK, WINDOW, TASKS_PER_ACTOR = 4, 8, 2
AMINO = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(autouse=True)
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 8 sequences, tasks of 4, two tasks per actor in flight; actors get the
    conftest's 10 minutes to start (this patch replaces that one, so it says it again: a
    loaded 2-core machine took over the stage's 120 s)."""
    monkeypatch.setattr(ray_stage, "RayOptions", functools.partial(
        RayOptions, rows_per_task=ROWS_PER_TASK, window_rows=WINDOW,
        tasks_per_actor=TASKS_PER_ACTOR, start_timeout_s=600.0))


def genes(count: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """`count` genes of 1-3 distinct proteins of 10-40 residues."""
    rng = random.Random(seed)
    out = []
    for g in range(count):
        out.append([(f"P{g}_{k}", "M" + "".join(rng.choices(AMINO, k=rng.randint(9, 39))))
                    for k in range(rng.randint(1, 3))])
    return out


@pytest.fixture
def stage(model: LoadedModel, checkpoint: Path) -> Iterator[tuple[RayStage, MemorySink]]:
    sink = MemorySink()
    options = EmbedOptions(toks_per_batch=256).for_model(model.max_residues)
    built = RayStage(model, sink, options,
                     StageOptions(ray="local", ray_actors=1, progress=False, cache=False),
                     keys=RowKeys("scope"), model_source=str(checkpoint), device="cpu")
    built.start()
    try:
        yield built, sink
    finally:
        built.stop()


def feed(stage: RayStage, sink: MemorySink, batches: Sequence[Sequence[tuple[str, str]]],
         on_submit: Any = None) -> int:
    """Submit gene by gene as gene mode does (full() -> wait_for_room, then submit);
    returns the most sequences the stage ever held: submitted, neither stored nor
    failed (what the driver keeps, seen from outside)."""
    submitted, most = 0, 0
    for batch in batches:
        if stage.full():
            stage.wait_for_room()
        stage.submit(batch)
        submitted += len(batch)
        most = max(most, submitted - len(sink.rows) - len(stage.failed))
        if on_submit is not None:
            on_submit(submitted)
    return most


def test_the_driver_holds_a_bounded_window_and_actors_load_the_model_once(
        stage: tuple[RayStage, MemorySink]) -> None:
    """150+ proteins through windows of 8, gene by gene: the stage never holds more than
    a window, the tasks in flight and one gene. Then a caller that never asks full()
    (FASTA mode submits everything at once) is held in submit() until at most two
    windows are unsent. Every row arrives; one actor, one model load for the run."""
    ray_stage_, sink = stage
    batches = genes(80)
    total = sum(len(b) for b in batches)
    most = feed(ray_stage_, sink, batches)
    in_flight = TASKS_PER_ACTOR * ROWS_PER_TASK
    assert total > 8 * (WINDOW + in_flight + 3)
    assert most <= WINDOW + in_flight + 3  # a window, the tasks in flight, one gene
    at_once = [named for gene in genes(40, seed=1) for named in gene]
    ray_stage_.submit(at_once)
    assert total + len(at_once) - len(sink.rows) <= 2 * WINDOW + in_flight
    ray_stage_.finish()
    assert len(sink.rows) == ray_stage_.embedded == total + len(at_once)
    assert not ray_stage_.failed
    stats = ray_stage_.stats
    assert stats is not None and stats.windows >= (total + len(at_once)) // (2 * WINDOW)
    assert stats.actors == 1 and len(stats.instances) == 1  # one start, one model load


def test_a_dead_actor_is_restarted_and_its_task_retried(
        stage: tuple[RayStage, MemorySink]) -> None:
    """The actor is killed mid-run (as the OOM killer or a lost node would): Ray starts it
    again (a second model load) and the tasks it held run again; nothing is lost."""
    ray_stage_, sink = stage
    batches = genes(40, seed=2)
    killed: list[bool] = []

    def kill_once(submitted: int) -> None:
        pool = ray_stage_.pool
        if not killed and pool is not None and pool.in_flight and submitted > 20:
            ray.kill(pool.actors[0], no_restart=False)
            killed.append(True)

    feed(ray_stage_, sink, batches, on_submit=kill_once)
    ray_stage_.finish()
    assert killed and not ray_stage_.failed
    assert len(sink.rows) == sum(len(b) for b in batches)
    stats = ray_stage_.stats
    assert stats is not None and len(stats.instances) == 2  # restarted: loaded again


def test_actors_that_cannot_load_the_model_are_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"the Ray actors could not load the model .*: "
                                         r"model checkpoint not found: .*missing\.pt$"):
        embed_on_ray([("k", "p", "MKTAYIAKQR")], model=str(tmp_path / "missing.pt"),
                     options=RayOptions(actors=1, device="cpu"), embed=EmbedOptions(),
                     on_rows=lambda keys, rows: None,
                     on_failure=lambda key, name, error: None)


def test_actors_the_cluster_cannot_place_are_a_model_error_not_a_hang(
        checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each actor asks for more CPUs than the 2-CPU cluster has: Ray would wait forever."""
    monkeypatch.setattr(ray_actors, "actor_resources",
                        lambda ray_, options: (1, {"num_cpus": 64.0}))
    with pytest.raises(ModelError, match=r"1 of 1 Ray actors did not start within 1 s: "
                                         r"the cluster lacks what each reserves \(cpus=64\)"):
        embed_on_ray([("k", "p", "MKTAYIAKQR")], model=str(checkpoint),
                     options=RayOptions(actors=1, device="cpu", start_timeout_s=1.0),
                     embed=EmbedOptions(), on_rows=lambda keys, rows: None,
                     on_failure=lambda key, name, error: None)
