"""What a model error tells its reader to do: the library cannot tell a Python caller from
the command line, so every hint names both ways to load a local model (it told Python
callers to pass --model_path, a flag they do not have)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from esm2_batch.errors import ModelError
from esm2_batch.models import load_model
from esm2_batch.models.weights import find_in_hf_cache


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty torch hub dir and HF cache, and a network that refuses at once."""
    def refuse(url: str, timeout: float | None = None) -> None:
        raise urllib.error.URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize(("load", "what"), [
    (lambda: load_model("8M"), "PATH"),  # the download fails
    (lambda: load_model("7M"), "PATH"),  # no such size
    (lambda: find_in_hf_cache("facebook/esm2_t6_8M_UR50D"), "FOLDER"),  # not in the HF cache
], ids=["offline-size", "unknown-size", "hf-cache"])
def test_the_hint_names_load_model_and_the_flag(load: Callable[[], object], what: str) -> None:
    with pytest.raises(ModelError) as info:
        load()
    message = str(info.value)
    assert f"load_model({what}) in Python" in message
    assert f"--model_path {what} on the command line" in message
    assert "\n" not in message
