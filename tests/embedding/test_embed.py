"""embed_sequences / iter_embeddings against fair-esm's own forward on a tiny random ESM2,
with both engines (the fast one and fair-esm's own as the reference)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from esm2_batch.embedding import embed
from esm2_batch.embedding.batch import DeviceBatch, HostBatch
from esm2_batch.embedding.batching import plan_windows
from esm2_batch.embedding.embed import Embedded, embed_sequences, iter_embeddings
from esm2_batch.embedding.sequences import clean_sequence
from esm2_batch.errors import EmbeddingError, InputError
from esm2_batch.models import LoadedModel, load_model
from tests.embedding.launches import first_residue_rows, on_launch
from tests.fakes.tiny_esm import fair_esm_states, write_tiny_checkpoint
from tests.tolerance import tolerance

LAYERS, EMBED = 3, 64
# fp32, another summation order (batching, engine): FFN-width reductions in every layer
TOLERANCE = tolerance(torch.float32, terms=4 * EMBED, depth=LAYERS)
AMINO = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), num_layers=LAYERS,
                                 embed_dim=EMBED)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> LoadedModel:
    return load_model(checkpoint)


@pytest.fixture(scope="module", params=["fast", "reference"])
def any_model(checkpoint: Path, request: pytest.FixtureRequest) -> LoadedModel:
    """Each engine in turn, for the tests that compare numbers with fair-esm's."""
    return load_model(checkpoint, engine=request.param)


@pytest.fixture(scope="module")
def fair_esm(checkpoint: Path) -> Callable[..., torch.Tensor]:
    """fair-esm's own module: (seq, layer=LAYERS) -> (T, E) states."""
    states = fair_esm_states(checkpoint)
    return lambda sequence, layer=LAYERS: states(sequence, layer)


@pytest.fixture(scope="module")
def proteins() -> list[str]:
    rng = random.Random(7)
    seqs = ["".join(rng.choices(AMINO, k=rng.randint(1, 300))) for _ in range(40)]
    return [*seqs, "M", "MKV", "XBUZO" * 3]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[HostBatch]:
    """Every launch the embedder sends to the model."""
    sent: list[HostBatch] = []
    on_launch(monkeypatch, lambda model, batch, layers: sent.append(batch.host))
    return sent


def fair_mean(fair_esm: Callable[..., torch.Tensor], seq: str) -> torch.Tensor:
    return fair_esm(seq)[1 : len(seq) + 1].mean(0)  # esm-extract's t[i, 1:n+1].mean(0)


@pytest.mark.parametrize(("toks_per_batch", "batch_size"),
                         [(302, None), (1000, None), (4096, None), (4096, 3)])
def test_rows_match_fair_esm_alone_any_batching(
    any_model: LoadedModel, fair_esm: Callable[..., torch.Tensor], proteins: list[str],
    toks_per_batch: int, batch_size: int | None,
) -> None:
    order = list(range(len(proteins)))
    random.Random(toks_per_batch).shuffle(order)
    shuffled = [proteins[i] for i in order]
    rows = embed_sequences(any_model, shuffled, toks_per_batch=toks_per_batch,
                           batch_size=batch_size)
    assert isinstance(rows, torch.Tensor)
    assert rows.shape == (len(proteins), any_model.embed_dim)
    assert rows.dtype == torch.float32 and rows.device.type == "cpu"
    assert not rows.is_inference()
    want = torch.stack([fair_mean(fair_esm, s) for s in shuffled])
    assert (rows - want).abs().max().item() <= TOLERANCE


def test_per_residue_and_bos_exclude_special_tokens(
    any_model: LoadedModel, fair_esm: Callable[..., torch.Tensor], proteins: list[str]
) -> None:
    seqs = proteins[:12]
    per_residue = embed_sequences(any_model, seqs, pooling="per_residue", toks_per_batch=700)
    bos = embed_sequences(any_model, seqs, pooling="bos", toks_per_batch=700)
    means = embed_sequences(any_model, seqs, toks_per_batch=700)
    assert isinstance(per_residue, list) and isinstance(bos, torch.Tensor)
    for i, seq in enumerate(seqs):
        states = fair_esm(seq)
        assert per_residue[i].shape == (len(seq), any_model.embed_dim)
        assert (per_residue[i] - states[1 : len(seq) + 1]).abs().max() <= TOLERANCE
        assert (bos[i] - states[0]).abs().max() <= TOLERANCE
        # the same fp32 states averaged over len(seq) residues in another order
        limit = tolerance(torch.float32, terms=len(seq),
                          magnitude=float(per_residue[i].abs().max()))
        assert torch.allclose(means[i], per_residue[i].mean(0), atol=limit, rtol=0)


@pytest.mark.parametrize("repr_layer", [0, 1, -2, -1])
def test_repr_layer(
    any_model: LoadedModel, fair_esm: Callable[..., torch.Tensor], repr_layer: int
) -> None:
    seq = "MKTAYIAKQRQISFVKSHFSRQ"
    layer = repr_layer % (LAYERS + 1)
    rows = embed_sequences(any_model, [seq, seq[:9]], repr_layer=repr_layer)
    assert (rows[0] - fair_esm(seq, layer)[1:-1].mean(0)).abs().max() <= TOLERANCE


def test_truncation_matches_esm_extract_slice(
    model: LoadedModel, fair_esm: Callable[..., torch.Tensor]
) -> None:
    seq = "".join(random.Random(3).choices(AMINO, k=300))
    rows = embed_sequences(model, [seq, seq[:50]], truncation=100)
    per_residue = embed_sequences(model, [seq], truncation=100, pooling="per_residue")
    # esm-extract: BatchConverter(truncation_seq_length=100) keeps tokens of seq[:100]
    assert (rows[0] - fair_mean(fair_esm, seq[:100])).abs().max() <= TOLERANCE
    assert per_residue[0].shape == (100, model.embed_dim)


def test_window_mode_averages_overlapping_windows(
    model: LoadedModel, fair_esm: Callable[..., torch.Tensor]
) -> None:
    seq = "".join(random.Random(5).choices(AMINO, k=5000))
    row = embed_sequences(model, [seq], long_seqs="window")
    total = torch.zeros(len(seq), model.embed_dim)
    count = torch.zeros(len(seq), 1)
    for start, end in plan_windows(len(seq)):
        total[start:end] += fair_esm(seq[start:end])[1:-1]
        count[start:end] += 1
    want = total / count
    assert len(plan_windows(len(seq))) == 7
    assert (row[0] - want.mean(0)).abs().max() <= TOLERANCE
    residues = embed_sequences(model, [seq], long_seqs="window", pooling="per_residue")
    assert residues[0].shape == (5000, model.embed_dim)
    assert (residues[0] - want).abs().max() <= TOLERANCE


def test_window_equals_truncate_when_it_fits(model: LoadedModel, proteins: list[str]) -> None:
    for pooling in ("mean", "bos"):
        a = embed_sequences(model, proteins, long_seqs="window", pooling=pooling)
        b = embed_sequences(model, proteins, long_seqs="truncate", pooling=pooling)
        assert torch.equal(a, b)


def test_duplicates_embedded_once(model: LoadedModel, spy: list[HostBatch]) -> None:
    seqs = ["MKVLA", "mkvla", "MKVLA*", ("other", "GGGG"), "MKVLA"]
    rows = embed_sequences(model, seqs)
    assert sum(batch.size for batch in spy) == 2
    assert all(torch.equal(rows[0], rows[i]) for i in (1, 2, 4))
    assert not torch.equal(rows[0], rows[3])


def test_oom_splits_batch_and_reports_lone_failure_by_name(
    any_model: LoadedModel, fair_esm: Callable[..., torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    widths: list[int] = []

    def small_gpu(loaded: LoadedModel, batch: DeviceBatch, layers: tuple[int, ...]) -> None:
        widths.append(batch.host.size)
        if batch.host.token_count > 150:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    on_launch(monkeypatch, small_gpu)
    rng = random.Random(11)
    seqs = [(f"p{i}", "".join(rng.choices(AMINO, k=40))) for i in range(6)]
    seqs.insert(3, ("titan", "M" * 200))
    results = list(iter_embeddings(any_model, seqs))
    assert sorted(r.index for r in results) == list(range(7))
    failed = [r for r in results if not r.ok]
    assert [r.name for r in failed] == ["titan"] and failed[0].row is None
    assert failed[0].error is not None and failed[0].error.name == "titan"
    assert "out of memory" in str(failed[0].error)
    for r in results:
        if r.ok:
            assert r.row is not None
            assert (r.row - fair_mean(fair_esm, seqs[r.index][1])).abs().max() <= TOLERANCE
    assert widths[0] > 1 and 1 in widths  # halved down to single sequences
    with pytest.raises(EmbeddingError, match="titan") as info:
        embed_sequences(any_model, seqs)
    assert info.value.name == "titan"


def test_non_finite_row_names_sequence(
    model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = model.alphabet.get_idx("W")
    forward = embed.forward_states

    def overflowing(model: LoadedModel, batch: DeviceBatch, layers: tuple[int, ...]
                    ) -> torch.Tensor:
        states = forward(model, batch, layers).clone()  # (n, rows, E)
        first = first_residue_rows(batch)
        poisoned = first[batch.tokens.flatten()[first] == poison]
        states[:, poisoned + 1, 2] = float("nan")  # the second residue's third channel
        return states

    monkeypatch.setattr(embed, "forward_states", overflowing)
    results = {r.name: r for r in iter_embeddings(model, [("good", "MKV"), ("bad", "WKV")])}
    assert results["good"].ok
    assert not results["bad"].ok and "non-finite" in str(results["bad"].error)
    with pytest.raises(EmbeddingError, match=r"'bad'.*non-finite"):
        embed_sequences(model, [("good", "MKV"), ("bad", "WKV")])


@pytest.mark.parametrize(("seq", "char", "position"), [
    ("ACJK", "J", 3), ("AC1K", "1", 3), ("AC K", " ", 3), ("A*CK", "*", 2),
    ("AC-K", "-", 3), ("ACK.", ".", 4), ("ACé", "é", 3), ("AC\n", "\n", 3),
])
def test_bad_letters_rejected_before_model_work(
    model: LoadedModel, spy: list[HostBatch], seq: str, char: str, position: int
) -> None:
    with pytest.raises(InputError) as info:
        embed_sequences(model, ["MKV", ("P12345", seq)])
    message = str(info.value)
    assert "'P12345'" in message and repr(char) in message and f"position {position}" in message
    assert spy == []


def test_letter_policy(model: LoadedModel) -> None:
    assert clean_sequence("mkvXbuzo*", name="x") == "MKVXBUZO"
    rows = embed_sequences(model, ["MKVL", "mkvl*"])
    assert torch.equal(rows[0], rows[1])
    with pytest.raises(InputError, match="empty"):
        embed_sequences(model, ["*"])


@pytest.mark.parametrize("options", [
    {"pooling": "max"}, {"long_seqs": "chunk"}, {"toks_per_batch": 0},
    {"batch_size": 0}, {"truncation": 0}, {"repr_layer": LAYERS + 1},
    {"repr_layer": -(LAYERS + 2)}, {"repr_layer": True},
])
def test_bad_options(model: LoadedModel, options: dict[str, object]) -> None:
    with pytest.raises(InputError):
        embed_sequences(model, ["MKV"], **options)  # type: ignore[arg-type]


def test_oversize_sequence_is_reported_not_run(
    model: LoadedModel, spy: list[HostBatch]
) -> None:
    seqs = [("short", "MKV"), ("long", "A" * 200)]
    with pytest.raises(InputError, match=r"long.*need up to 202 tokens.*toks_per_batch is 100"):
        embed_sequences(model, seqs, toks_per_batch=100)
    assert spy == []
    assert embed_sequences(model, seqs, toks_per_batch=100, truncation=90).shape[0] == 2
    for batch in spy:
        assert batch.token_count <= 100


def test_iter_validates_eagerly_and_yields_each_input_once(
    model: LoadedModel, proteins: list[str]
) -> None:
    with pytest.raises(InputError):
        iter_embeddings(model, ["MKV", "J"])  # no next(): raised by the call itself
    results = list(iter_embeddings(model, [*proteins, proteins[0]], toks_per_batch=500))
    assert all(isinstance(r, Embedded) and r.ok for r in results)
    assert not any(r.row is None or r.row.is_inference() for r in results)
    assert sorted(r.index for r in results) == list(range(len(proteins) + 1))
    assert {r.name for r in results} == {str(i) for i in range(len(proteins) + 1)}


def test_grad_enabled_call_after_embedding(any_model: LoadedModel) -> None:
    seq = "MKTAYIAKQR"
    embed_sequences(any_model, [seq])  # reference: builds the rotary cache in inference_mode
    _, _, tokens = any_model.alphabet.get_batch_converter()([("x", seq)])
    out = any_model.module(tokens, repr_layers=[LAYERS])["representations"][LAYERS]
    out.sum().backward()
    assert any_model.module.embed_tokens.weight.grad is not None
    any_model.module.zero_grad(set_to_none=True)


def test_input_shapes(model: LoadedModel) -> None:
    assert embed_sequences(model, []).shape == (0, model.embed_dim)
    assert embed_sequences(model, [], pooling="per_residue") == []
    with pytest.raises(InputError, match="not one string"):
        embed_sequences(model, "MKV")
    with pytest.raises(InputError, match="item 1"):
        embed_sequences(model, ["MKV", ("a", "b", "c")])  # type: ignore[list-item]
