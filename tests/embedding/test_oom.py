"""CUDA out-of-memory handling, on CPU with an injected torch.cuda.OutOfMemoryError: a
batch the "device" cannot hold is halved until it fits, every row comes out as in an
unconstrained run, and a sequence that does not fit even alone fails by name while the
others go on."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from esm2_batch.embedding import embed
from esm2_batch.embedding.embed import embed_sequences, iter_embeddings
from esm2_batch.errors import EmbeddingError
from esm2_batch.models import LoadedModel, load_model, representations
from tests.fakes.tiny_esm import write_tiny_checkpoint
from tests.tolerance import tolerance

LAYERS, EMBED = 3, 64
AMINO = "ACDEFGHIKLMNPQRSTVWY"


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


def device_holding(max_rows: int, monkeypatch: pytest.MonkeyPatch,
                   never: str | None = None, model: LoadedModel | None = None) -> list[int]:
    """Make every forward of more than `max_rows` sequences (and any forward holding the
    sequence `never`) raise CUDA's OOM; returns the batch sizes tried, in order."""
    tried: list[int] = []
    poison = None
    if never is not None and model is not None:
        poison = embed._encode(never, embed._token_table(model))

    def limited(loaded: LoadedModel, tokens: torch.Tensor, *, layer: int) -> torch.Tensor:
        tried.append(tokens.shape[0])
        holds_poison = poison is not None and any(
            row[1 : poison.numel() + 1].tolist() == poison.tolist()
            and int(row[poison.numel() + 1]) == loaded.alphabet.eos_idx for row in tokens)
        if tokens.shape[0] > max_rows or holds_poison:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")
        return representations(loaded, tokens, layer=layer)

    monkeypatch.setattr(embed, "representations", limited)
    return tried


@pytest.mark.parametrize("max_rows", [1, 3, 5])
def test_halving_gives_the_unconstrained_rows(
    any_model: LoadedModel, proteins: list[tuple[str, str]], max_rows: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    want = embed_sequences(any_model, proteins, toks_per_batch=4096)
    tried = device_holding(max_rows, monkeypatch)
    got = embed_sequences(any_model, proteins, toks_per_batch=4096)
    assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
    assert max(tried) > max_rows  # the planned batches really did not fit
    assert any(size <= max_rows for size in tried)
    # the same rows in smaller padded batches: fp32, another summation order at most
    limit = tolerance(torch.float32, terms=4 * EMBED, depth=LAYERS)
    assert float((got - want).abs().max()) <= limit


def test_lone_sequence_that_never_fits_fails_by_name(
    any_model: LoadedModel, proteins: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    want = embed_sequences(any_model, proteins)
    assert isinstance(want, torch.Tensor)
    huge = "".join(random.Random(99).choices(AMINO, k=300))
    seqs = [*proteins[:11], ("huge", huge), *proteins[11:]]
    device_holding(4, monkeypatch, never=huge, model=any_model)
    results = sorted(iter_embeddings(any_model, seqs), key=lambda r: r.index)
    assert [r.name for r in results if not r.ok] == ["huge"]
    error = results[11].error
    assert error is not None and error.name == "huge" and "out of memory" in str(error)
    assert "300 residues" in str(error)
    got = torch.stack([r.row for r in results if r.row is not None])
    limit = tolerance(torch.float32, terms=4 * EMBED, depth=LAYERS)
    assert float((got - want).abs().max()) <= limit
    with pytest.raises(EmbeddingError, match=r"1 sequence\(s\).*'huge'.*out of memory"):
        embed_sequences(any_model, seqs)
