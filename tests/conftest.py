"""Shared test setup."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from esm2_batch.models import LoadedModel, load_model
from tests.fakes.tiny_esm import write_tiny_checkpoint
from tests.unprivileged import Unprivileged


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tests' models are tiny: intra-op threads gain nothing on them and, on a shared
    2-core machine, only spin against other processes (10x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[0o022, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under this umask (the common one, and a private one); the old one
    comes back whatever happens."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture(autouse=True)
def own_row_cache(tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty row cache of its own (store/cache.py), never the user's
    ~/.cache: a test sees exactly the rows it made."""
    directory = tmp_path_factory.mktemp("row_cache")
    monkeypatch.setenv("ESM2_BATCH_CACHE_DIR", str(directory))
    return directory


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ESM2 (2 layers, dim 32) in fair-esm's official checkpoint layout."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model"), num_layers=2, embed_dim=32)


@pytest.fixture(scope="session")
def model(checkpoint: Path) -> LoadedModel:
    """That checkpoint loaded through the real loading path, on the CPU."""
    return load_model(checkpoint, device="cpu")


@pytest.fixture
def unprivileged(tmp_path: Path) -> Iterator[Unprivileged]:
    """A place where permissions bite for the user `run` asks as (tests/unprivileged.py):
    pytest's tmp_path is private to root, so as root it is a fresh world-reachable
    directory, removed afterwards."""
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    if os.geteuid() != 0:
        yield Unprivileged(tmp_path, as_nobody=False)
        return
    root = Path(tempfile.mkdtemp())
    root.chmod(0o755)
    try:
        yield Unprivileged(root, as_nobody=True)
    finally:
        shutil.rmtree(root)  # root removes whatever the test locked


RAY_MODULES = "tests/run/test_ray_"
"""The modules whose tests share one local Ray cluster (tests/run/conftest.py)."""


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, called where it runs
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist, every Ray test runs on one worker, in order: they share one
    cluster, and two clusters side by side on a 2-core machine only slow each other
    down. Any other test goes wherever a worker is free. (xdist's own --dist loadgroup
    does this by marks, but it renames the test ids through an attribute pytest 9.2 no
    longer reads, so its groups are silently ignored.)"""
    from xdist.scheduler import LoadScopeScheduling

    class RayTogether(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if nodeid.startswith(RAY_MODULES) else nodeid

    return RayTogether(config, log)
