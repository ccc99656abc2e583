"""CUDA out-of-memory handling, on CPU with an injected torch.cuda.OutOfMemoryError: a
launch the "device" cannot hold (in the forward, the pooling or the copy to the host) is
halved until it fits, every row comes out as in an unconstrained run, the size that fit
is remembered so later batches do not overflow again, and a sequence that does not fit
even alone fails by name while the others go on."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from esm2_batch.embedding import budget, embed
from esm2_batch.embedding.batch import HostBatch
from esm2_batch.embedding.embed import embed_sequences, iter_embeddings
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.errors import EmbeddingError
from esm2_batch.models import LoadedModel, load_model
from tests.embedding.launches import on_launch, piece_residues
from tests.fakes.tiny_esm import write_tiny_checkpoint
from tests.tolerance import tolerance

LAYERS, EMBED = 3, 64
AMINO = "ACDEFGHIKLMNPQRSTVWY"
# the same rows in smaller batches: fp32, another summation order at most
LIMIT = tolerance(torch.float32, terms=4 * EMBED, depth=LAYERS)
STAGES = ("forward_states", "pool_batch", "send")
"""The three steps of a launch an out-of-memory is injected into (embed's names)."""


@pytest.fixture(scope="module", params=["fast", "reference"])
def any_model(tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> LoadedModel:
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("oom"), num_layers=LAYERS,
                                 embed_dim=EMBED)
    return load_model(Path(path), engine=request.param)


@pytest.fixture(scope="module")
def proteins() -> list[tuple[str, str]]:
    rng = random.Random(5)
    return [(f"p{i}", "".join(rng.choices(AMINO, k=rng.randint(20, 260)))) for i in range(23)]


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")


def device_holding(monkeypatch: pytest.MonkeyPatch, *, max_rows: int | None = None,
                   max_tokens: int | None = None, stage: str = "forward_states",
                   never: str | None = None, model: LoadedModel | None = None,
                   ) -> list[HostBatch]:
    """Make `stage` of every launch of more than `max_rows` sequences or `max_tokens`
    tokens (and any launch holding the sequence `never`) raise CUDA's OOM; returns every
    launch tried, in order (those that overflowed too)."""
    tried: list[HostBatch] = []
    poison = None
    if never is not None and model is not None:
        poison = embed._encode(never, embed._token_table(model)).long()
    original: Callable[..., Any] = getattr(embed, stage)
    if stage != "forward_states":  # still record every launch, at its forward
        on_launch(monkeypatch, lambda loaded, batch, layers: tried.append(batch.host))

    def limited(*args: Any) -> Any:
        host: HostBatch = args[1] if stage == "send" else args[1].host
        if stage == "forward_states":
            tried.append(host)
        too_big = ((max_rows is not None and host.size > max_rows)
                   or (max_tokens is not None and host.token_count > max_tokens))
        holds_poison = poison is not None and stage == "forward_states" and any(
            torch.equal(residues, poison) for residues in piece_residues(args[1]))
        if too_big or holds_poison:
            raise oom()
        return original(*args)

    monkeypatch.setattr(embed, stage, limited)
    return tried


@pytest.mark.parametrize("max_rows", [1, 3, 5])
def test_halving_gives_the_unconstrained_rows(
    any_model: LoadedModel, proteins: list[tuple[str, str]], max_rows: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    want = embed_sequences(any_model, proteins, toks_per_batch=4096)
    tried = device_holding(monkeypatch, max_rows=max_rows)
    got = embed_sequences(any_model, proteins, toks_per_batch=4096)
    assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
    assert max(b.size for b in tried) > max_rows  # the planned batches really did not fit
    assert any(b.size <= max_rows for b in tried)
    assert float((got - want).abs().max()) <= LIMIT


@pytest.mark.parametrize("stage", STAGES)
def test_oom_anywhere_in_a_launch_halves_it(
    any_model: LoadedModel, proteins: list[tuple[str, str]], stage: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    want = embed_sequences(any_model, proteins, toks_per_batch=4096)
    tried = device_holding(monkeypatch, max_tokens=1500, stage=stage)
    got = embed_sequences(any_model, proteins, toks_per_batch=4096)
    assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
    assert tried[0].token_count > 1500 and len(tried) > 1
    assert float((got - want).abs().max()) <= LIMIT


def test_the_size_that_fit_is_remembered(
    any_model: LoadedModel, proteins: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three planned batches: only the first overflows; the others, and a second call on
    the same model, are cut to the size that fit before they are launched."""
    sequences = [*proteins, *((f"q{i}", s[::-1]) for i, (_, s) in enumerate(proteins))]
    tried = device_holding(monkeypatch, max_tokens=1200)
    rows = embed_sequences(any_model, sequences, toks_per_batch=2000)
    assert isinstance(rows, torch.Tensor) and rows.shape[0] == len(sequences)
    assert [b.token_count > 1200 for b in tried[:3]] == [True, False, False]
    limit = budget.launch_limit(any_model)
    assert limit == tried[0].token_count // 2
    assert len(tried) > 4 and all(b.token_count <= limit for b in tried[3:])
    tried.clear()
    embed_sequences(any_model, sequences, toks_per_batch=2000)
    assert tried and all(b.token_count <= limit for b in tried)
    meta = budget.budget_meta(any_model, EmbedOptions(toks_per_batch=2000))
    assert meta["overflows"] == 1 and meta["launch_limit"] == limit


def test_lone_sequence_that_never_fits_fails_by_name(
    any_model: LoadedModel, proteins: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    want = embed_sequences(any_model, proteins)
    assert isinstance(want, torch.Tensor)
    huge = "".join(random.Random(99).choices(AMINO, k=300))
    seqs = [*proteins[:11], ("huge", huge), *proteins[11:]]
    device_holding(monkeypatch, max_rows=4, never=huge, model=any_model)
    results = sorted(iter_embeddings(any_model, seqs), key=lambda r: r.index)
    assert [r.name for r in results if not r.ok] == ["huge"]
    error = results[11].error
    assert error is not None and error.name == "huge" and "out of memory" in str(error)
    assert "300 residues" in str(error)
    got = torch.stack([r.row for r in results if r.row is not None])
    assert float((got - want).abs().max()) <= LIMIT
    with pytest.raises(EmbeddingError, match=r"1 sequence\(s\).*'huge'.*out of memory"):
        embed_sequences(any_model, seqs)


def test_a_lone_failure_does_not_lower_the_limit(
    any_model: LoadedModel, proteins: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    huge = "".join(random.Random(98).choices(AMINO, k=300))
    device_holding(monkeypatch, never=huge, model=any_model)
    results = list(iter_embeddings(any_model, [("huge", huge)]))
    assert not results[0].ok and budget.launch_limit(any_model) is None
