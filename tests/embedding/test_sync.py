"""The batch loop never makes the host wait for the device: counted on CPU, every call
that would synchronise with a GPU (a Python read of a tensor's values or truth, a copy
to the CPU, a data-dependent shape) made while the batches run, per launch."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from esm2_batch.embedding.embed import Embedded, embed_rows
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.models import LoadedModel, load_model
from tests.embedding.launches import on_launch
from tests.fakes.tiny_esm import write_tiny_checkpoint

SYNCHRONISING = ("item", "tolist", "cpu", "nonzero", "__bool__", "__int__", "__float__")
"""torch.Tensor methods that read device values on the host (DESIGN.md, GPU facts)."""
SYNCS_PER_LAUNCH = 1
"""The design: one read per launch, of its flags, from the host copy after its event
(pooling.Flight.land); everything else is known on the host or stays on the device."""
AMINO = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("sync"), num_layers=2,
                                            embed_dim=32), device="cpu")


def counted(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Record every synchronising call from now on (the original still runs)."""
    for name in SYNCHRONISING:
        original: Callable[..., Any] = getattr(torch.Tensor, name)

        def recording(self: torch.Tensor, *args: Any, _name: str = name,
                      _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recording)


def run_counting(model: LoadedModel, sequences: list[str], monkeypatch: pytest.MonkeyPatch,
                 options: EmbedOptions) -> tuple[list[Embedded], int, list[str]]:
    """Plan (outside the count), then run every batch counting: the results, the
    launches and the synchronising calls made while they ran."""
    launches: list[int] = []
    on_launch(monkeypatch, lambda loaded, batch, layers: launches.append(batch.host.size))
    results: Iterator[Embedded] = embed_rows(model, sequences, options)
    calls: list[str] = []
    with monkeypatch.context() as patch:
        counted(patch, calls)
        done = list(results)
    return done, len(launches), calls


@pytest.mark.parametrize("options", [
    EmbedOptions(toks_per_batch=1500),
    EmbedOptions(toks_per_batch=1500, repr_layers=(1, -1), include=("mean", "bos", "max", "std")),
    EmbedOptions(toks_per_batch=1500, pooling="per_residue"),
    EmbedOptions(toks_per_batch=1500, per_tok=True)], ids=["mean", "layers-poolers",
                                                          "per_residue", "per_tok"])
def test_one_synchronising_read_per_launch(
    model: LoadedModel, monkeypatch: pytest.MonkeyPatch, options: EmbedOptions
) -> None:
    rng = random.Random(3)
    sequences = ["".join(rng.choices(AMINO, k=rng.randint(5, 400))) for _ in range(60)]
    results, launches, calls = run_counting(model, sequences, monkeypatch, options)
    assert len(results) == 60 and all(r.ok for r in results)
    assert launches >= 5  # several batches, of many sequences each
    assert len(calls) <= SYNCS_PER_LAUNCH * launches, calls
    assert not results[0].rows[0].is_inference()


def test_per_tok_states_and_rows_are_their_own_memory(
    model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sequences = ["MKTAYIAKQR", "MKV", "GGGGSSSS"]
    results, launches, calls = run_counting(model, sequences, monkeypatch,
                                            EmbedOptions(per_tok=True))
    assert launches == 1 and len(calls) <= SYNCS_PER_LAUNCH
    storages = {r.row.untyped_storage().data_ptr() for r in results if r.row is not None}
    storages |= {s.untyped_storage().data_ptr() for r in results for s in r.residues}
    assert len(storages) == 2 * len(sequences)  # a clone each: none holds a batch buffer
    for result in results:
        assert result.residues[0].shape == (len(sequences[result.index]), model.embed_dim)
