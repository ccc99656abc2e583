"""Fixtures of the run tests that start a local Ray cluster."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One small local cluster per test module (starting one costs seconds): 2 CPUs,
    80 MB of object store, token authentication off (it listens on this machine only)."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
                 log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
