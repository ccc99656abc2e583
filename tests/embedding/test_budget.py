"""toks_per_batch "auto": sized from a fake torch.cuda.mem_get_info for a model that says
it is on CUDA (nothing runs there), 4,096 elsewhere, recorded in meta; the CLI's flag."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import typer

from esm2_batch.cli_flags import parse_toks
from esm2_batch.embedding import budget
from esm2_batch.embedding.budget import (
    CPU_TOKENS,
    FREE_FRACTION,
    MAX_AUTO_TOKENS,
    RESERVE_BYTES,
    as_requested,
    auto_size,
    budget_meta,
    bytes_per_token,
    sized,
)
from esm2_batch.embedding.options import AUTO_TOKENS, EmbedOptions
from esm2_batch.errors import InputError
from esm2_batch.models import LoadedModel, load_model
from tests.fakes.tiny_esm import write_tiny_checkpoint

GIB = 1 << 30


@pytest.fixture(scope="module", params=["fast", "reference"])
def cpu_model(tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> LoadedModel:
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("budget"), num_layers=2,
                                 embed_dim=64)
    return load_model(path, device="cpu", engine=request.param)


def on_cuda(model: LoadedModel, dtype: torch.dtype = torch.float16) -> LoadedModel:
    """The same model claiming to run on CUDA in `dtype` (only its facts are read)."""
    encoder = dataclasses.replace(model.encoder, device=torch.device("cuda"),  # type: ignore[type-var]
                                  dtype=dtype)
    return dataclasses.replace(model, encoder=encoder)


def fake_gpu(monkeypatch: pytest.MonkeyPatch, free: int, *, cached: int = 0) -> list[int]:
    """torch.cuda's memory queries answering `free` bytes (plus `cached` held unused by
    the allocator); returns the list of calls made."""
    calls: list[int] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        calls.append(1)
        return free, 80 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: cached + GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: GIB)
    return calls


def test_auto_is_the_default_and_cpu_keeps_4096(cpu_model: LoadedModel) -> None:
    assert EmbedOptions().toks_per_batch == AUTO_TOKENS
    assert EmbedOptions(toks_per_batch="auto").toks_per_batch == AUTO_TOKENS  # type: ignore[arg-type]
    assert sized(EmbedOptions(), cpu_model).toks_per_batch == CPU_TOKENS == 4096
    assert sized(EmbedOptions(toks_per_batch=700), cpu_model).toks_per_batch == 700
    options = sized(EmbedOptions(), cpu_model)
    assert sized(options, cpu_model) == options  # the run's stages size them again
    meta = budget_meta(cpu_model, options)
    assert meta == {"toks_per_batch": 4096, "requested": "auto", "auto": None,
                    "launch_limit": None, "overflows": 0}


def test_as_requested_gives_auto_back_only_where_sized_filled_it_in(
        cpu_model: LoadedModel) -> None:
    """What a Ray actor is sent: "auto" stays "auto" (it sizes on its own device), a
    number the user gave stays that number."""
    auto = sized(EmbedOptions(), cpu_model)
    assert as_requested(auto, cpu_model).toks_per_batch == AUTO_TOKENS
    other = sized(EmbedOptions(toks_per_batch=700), cpu_model)
    assert as_requested(other, cpu_model).toks_per_batch == 700
    assert as_requested(sized(EmbedOptions(), cpu_model), cpu_model).toks_per_batch == -1


def test_budget_meta_of_a_ray_run_is_the_actors(cpu_model: LoadedModel) -> None:
    options = sized(EmbedOptions(), cpu_model)
    meta = budget_meta(cpu_model, options, {"b": 65536, "a": 65536})
    assert meta == {"toks_per_batch": 65536, "requested": "auto", "auto": None,
                    "launch_limit": None, "overflows": None,
                    "sized_on": "each Ray actor's device", "actors": {"a": 65536, "b": 65536}}


def test_auto_on_cuda_from_free_memory(cpu_model: LoadedModel,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model = on_cuda(cpu_model)
    calls = fake_gpu(monkeypatch, 2 * GIB, cached=GIB // 2)
    options = sized(EmbedOptions(), model)
    per_token = bytes_per_token(model, options)
    free = 2 * GIB + GIB // 2  # the driver's free memory and the allocator's unused cache
    want = (int(free * FREE_FRACTION) - RESERVE_BYTES) // per_token
    assert options.toks_per_batch == min(want, MAX_AUTO_TOKENS) and options.truncation == 1022
    fake_gpu(monkeypatch, GIB // 4)  # the cache would make a second reading smaller
    assert sized(EmbedOptions(), model).toks_per_batch == options.toks_per_batch
    assert len(calls) == 1  # sized once per model
    meta = budget_meta(model, options)
    assert meta["requested"] == "auto" and meta["toks_per_batch"] == options.toks_per_batch
    assert meta["auto"]["free_bytes"] == free and meta["auto"]["bytes_per_token"] == per_token
    assert sized(options, model) == options  # sized options come back unchanged
    assert budget_meta(model, options)["requested"] == "auto"
    assert sized(EmbedOptions(toks_per_batch=2048), model).toks_per_batch == 2048
    assert budget_meta(model, EmbedOptions(toks_per_batch=2048))["auto"] is None


def test_auto_is_capped_and_holds_one_longest_sequence() -> None:
    big = auto_size(80 * GIB, 1000, longest=1024)
    assert big.tokens == MAX_AUTO_TOKENS and big.capped
    tiny = auto_size(GIB // 4, 1000, longest=1024)
    assert tiny.tokens == 1024 and not tiny.capped  # below the reserve: one sequence


def test_bytes_per_token_follow_the_work(cpu_model: LoadedModel) -> None:
    half, full = on_cuda(cpu_model), on_cuda(cpu_model, torch.float32)
    options = EmbedOptions().for_model(1022)
    several = dataclasses.replace(options, repr_layers=(0, 1, 2))
    assert bytes_per_token(full, options) > bytes_per_token(half, options)
    assert bytes_per_token(half, several) > bytes_per_token(half, options)
    dim = cpu_model.embed_dim
    linear = 2 * dim * (budget.ACTIVATION_WIDTHS + 1) + 4 * dim * budget.POOLING_WIDTHS
    if cpu_model.fast is not None:  # packed, no (T, T) scores
        assert bytes_per_token(half, options) == linear
    else:  # fair-esm's fp32 scores and probabilities for every head at 1,024 tokens
        assert bytes_per_token(half, options) == linear + 2 * 4 * 4 * 1024


def test_cli_flag_and_options_accept_auto(tmp_path: Path) -> None:
    assert parse_toks("auto") == parse_toks("AUTO") == AUTO_TOKENS
    assert parse_toks("2048") == 2048 and parse_toks(AUTO_TOKENS) == AUTO_TOKENS
    with pytest.raises(typer.BadParameter):
        parse_toks("lots")
    for bad in (0, -2, True):
        with pytest.raises(InputError, match="toks_per_batch"):
            EmbedOptions(toks_per_batch=bad).check_values()
    model = load_model(write_tiny_checkpoint(tmp_path, num_layers=1, embed_dim=32))
    assert sized(EmbedOptions(toks_per_batch="auto"), model).toks_per_batch == 4096  # type: ignore[arg-type]
