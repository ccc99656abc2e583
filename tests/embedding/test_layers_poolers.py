"""Several layers and poolers from one forward (--repr_layers, --include), against
fair-esm's own representations[L] pooled directly, with both engines."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from esm2_batch.embedding import embed
from esm2_batch.embedding.embed import embed_sequences, iter_embeddings
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.errors import InputError
from esm2_batch.models import LoadedModel, layer_states, load_model, representations
from tests.embedding.launches import on_launch
from tests.fakes.tiny_esm import fair_esm_states, write_tiny_checkpoint
from tests.tolerance import tolerance

LAYERS, EMBED = 3, 64
# fp32, another summation order (batching, engine): FFN-width reductions in every layer
TOLERANCE = tolerance(torch.float32, terms=4 * EMBED, depth=LAYERS)
AMINO = "ACDEFGHIKLMNPQRSTVWY"
POOL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda t: t[1:-1].mean(0), "bos": lambda t: t[0],
    "max": lambda t: t[1:-1].amax(0), "std": lambda t: t[1:-1].std(0, correction=0)}
"""Each pooler written directly on (T, E) states of one unpadded sequence (BOS ... EOS)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), num_layers=LAYERS,
                                 embed_dim=EMBED)


@pytest.fixture(scope="module", params=["fast", "reference"])
def any_model(checkpoint: Path, request: pytest.FixtureRequest) -> LoadedModel:
    return load_model(checkpoint, engine=request.param)


@pytest.fixture(scope="module")
def fair_esm(checkpoint: Path) -> Callable[[str, int], torch.Tensor]:
    """fair-esm's own module: (seq, layer) -> (T, E) representations[layer]."""
    return fair_esm_states(checkpoint)


def proteins(count: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(AMINO, k=rng.randint(1, 120))) for _ in range(count)]


def test_rows_per_layer_and_pooler_equal_fair_esm(
    any_model: LoadedModel, fair_esm: Callable[[str, int], torch.Tensor]
) -> None:
    seqs = proteins(12)
    found = embed_sequences(any_model, seqs, repr_layers=[1, -1, 0],
                            include=["mean", "bos", "max", "std"], toks_per_batch=600)
    assert isinstance(found, dict)
    assert list(found)[:5] == ["mean_layer1", "bos_layer1", "max_layer1", "std_layer1",
                               "mean_layer3"]
    assert len(found) == 12
    for name, matrix in found.items():
        pooler, layer = name.split("_layer")
        assert matrix.shape == (len(seqs), EMBED) and matrix.dtype == torch.float32
        for i, seq in enumerate(seqs):
            want = POOL[pooler](fair_esm(seq, int(layer)))
            assert (matrix[i] - want).abs().max() <= TOLERANCE, (name, i)
    one = embed_sequences(any_model, seqs, repr_layer=1, toks_per_batch=600)
    assert isinstance(one, torch.Tensor)
    assert torch.equal(found["mean_layer1"], one)  # the first matrix is the one-layer row


def test_one_forward_serves_every_layer(
    any_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    on_launch(monkeypatch, lambda model, batch, layers: calls.append(layers))
    results = list(iter_embeddings(any_model, proteins(5), repr_layers=(2, 0, -1),
                                   include=("max",)))
    assert calls == [(2, 0, 3)]  # one batch, one forward, absolute layers
    for result in results:
        assert result.row is not None and result.rows[0] is result.row
        assert result.packed is not None and result.packed.shape == (3 * EMBED,)


def test_encoders_states_match_one_layer_calls(any_model: LoadedModel) -> None:
    tokens = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
    states = layer_states(any_model, tokens, layers=(3, 1, 0))
    for k, layer in enumerate((3, 1, 0)):
        assert torch.equal(states[k], representations(any_model, tokens, layer=layer))


def test_window_max_and_std_are_over_the_averaged_residue_states(
    any_model: LoadedModel,
) -> None:
    """Window mode: max/std over each residue's state averaged over its windows (the
    per-residue output), computed directly with torch."""
    seq = proteins(1, seed=9)[0] * 4  # longer than one 60-residue window
    kwargs: dict[str, object] = {"long_seqs": "window", "truncation": 60}
    residues = embed_sequences(any_model, [seq], pooling="per_residue", repr_layer=2,
                               **kwargs)[0]  # type: ignore[arg-type]
    found = embed_sequences(any_model, [seq], repr_layers=(2,), include=("mean", "max", "std"),
                            **kwargs)  # type: ignore[arg-type]
    assert isinstance(found, dict) and isinstance(residues, torch.Tensor)
    exact = tolerance(torch.float32, terms=len(seq))
    assert (found["max_layer2"][0] - residues.amax(0)).abs().max() <= exact
    assert (found["std_layer2"][0] - residues.std(0, correction=0)).abs().max() <= exact
    assert (found["mean_layer2"][0] - residues.mean(0)).abs().max() <= exact
    alone = embed_sequences(any_model, [seq], repr_layer=2, **kwargs)  # type: ignore[arg-type]
    assert isinstance(alone, torch.Tensor)
    assert torch.equal(found["mean_layer2"], alone)  # mean folds in as before, bit for bit


def test_one_residue_std_is_zero(any_model: LoadedModel) -> None:
    found = embed_sequences(any_model, ["M"], include=("std", "max"))
    assert isinstance(found, dict)
    assert torch.equal(found["std_layer3"], torch.zeros(1, EMBED))


@pytest.mark.parametrize(("options", "message"), [
    ({"repr_layers": (LAYERS + 1,)}, "beyond"),
    ({"repr_layers": (1, -(LAYERS + 2))}, "beyond"),
    ({"include": ("mean", "median")}, "unknown pooler 'median'"),
    ({"include": ("max", "max")}, "twice"),
    ({"repr_layers": (3, -1)}, "twice"),
    ({"repr_layers": (1,), "repr_layer": 2}, "disagree"),
    ({"include": ("max",), "pooling": "bos"}, "disagree"),
])
def test_bad_layers_and_poolers_fail_before_any_work(
    any_model: LoadedModel, options: dict[str, object], message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(embed, "forward_states", None)  # any forward would raise TypeError
    with pytest.raises(InputError, match=message) as info:
        embed_sequences(any_model, ["MKV"], **options)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_options_name_their_matrices() -> None:
    options = EmbedOptions(repr_layers=[20, -1], include=["mean", "max"])  # type: ignore[arg-type]
    assert options.repr_layers == (20, -1) and options.poolers == ("mean", "max")
    assert options.matrices(name="m", num_layers=33) == (
        ("mean", 20), ("max", 20), ("mean", 33), ("max", 33))
    assert EmbedOptions().matrices(name="m", num_layers=33) == (("mean", 33),)
    assert EmbedOptions(pooling="bos", repr_layer=4).matrices(name="m", num_layers=6) == (
        ("bos", 4),)


def test_per_residue_with_several_layers_returns_every_layer(any_model: LoadedModel) -> None:
    """It returned the first layer's list alone, dropping the others without a word."""
    seqs = ["MKTAYIAKQR", "MLSDEDFKAVGG"]
    model = any_model
    both = embed_sequences(model, seqs, pooling="per_residue", repr_layers=(2, 1))
    assert isinstance(both, dict) and list(both) == ["per_residue_layer2", "per_residue_layer1"]
    for layer in (1, 2):
        alone = embed_sequences(model, seqs, pooling="per_residue", repr_layer=layer)
        assert isinstance(alone, list)
        got = both[f"per_residue_layer{layer}"]
        assert isinstance(got, list) and [s.shape for s in got] == [(10, EMBED), (12, EMBED)]
        assert all(torch.equal(a, b) for a, b in zip(alone, got, strict=True))
