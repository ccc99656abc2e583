"""Fixtures of the run tests that start a local Ray cluster."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def ray_cluster(request: pytest.FixtureRequest) -> Iterator[None]:
    """One small local cluster (starting one costs seconds): 2 CPUs, 80 MB of object
    store, token authentication off (it listens on this machine only). Modules that use
    it one after another share it; it is shut down after the last of them, so no other
    test runs beside an idle cluster."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        os.environ["RAY_AUTH_MODE"] = "disabled"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
                     log_to_driver=False, configure_logging=False)
    yield
    if not _next_module_wants_it(request):
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


def _next_module_wants_it(request: pytest.FixtureRequest) -> bool:
    """Whether the test right after this module's last one uses the cluster too."""
    items = request.session.items
    ours = [i for i, item in enumerate(items) if getattr(item, "module", None) is request.module]
    following = items[ours[-1] + 1:ours[-1] + 2] if ours else []
    return any("ray_cluster" in item.fixturenames for item in following)
