"""Fixtures of the run tests that start a local Ray cluster."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Generator

import pytest

from esm2_batch.run.ray_cluster import local_environment


@pytest.fixture
def ray_cluster() -> None:
    """One small local cluster (starting one costs seconds): 2 CPUs, 80 MB of object
    store, started as `--ray local` starts one (auth off, workers not niced). Consecutive
    tests that use it share it; it is shut down after the last of them (the teardown hook
    below), so no other test runs beside an idle cluster."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        local_environment()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
                     log_to_driver=False, configure_logging=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item,
                            nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """Shut the cluster down after a test that used it (after its own fixtures' teardown,
    which may still kill actors) unless the next test this process runs uses it too.
    pytest's `nextitem` is the one this process runs next, also under pytest-xdist, where
    the collection order says nothing about a worker's order."""
    yield
    if "ray_cluster" not in getattr(item, "fixturenames", ()):
        return
    if nextitem is not None and "ray_cluster" in getattr(nextitem, "fixturenames", ()):
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def patient_actor_start(request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray tests give actors 10 minutes to start instead of the stage's 120 s: a start
    takes seconds, but on a loaded 2-core machine (both cores busy, the suite's own
    processes) a fresh worker importing torch can take minutes. A hang still ends."""
    if "ray_cluster" in request.fixturenames:
        from esm2_batch.run import ray_stage

        monkeypatch.setattr(ray_stage, "RayOptions",
                            functools.partial(ray_stage.RayOptions, start_timeout_s=600.0))
