"""Shared test setup."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from esm2_batch.models import LoadedModel, load_model
from tests.fakes.tiny_esm import write_tiny_checkpoint


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
