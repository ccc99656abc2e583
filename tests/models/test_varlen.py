"""The fast engine's packed (unpadded) path against fair-esm's own ESM2.forward on tiny
random models: every layer, every real position, each attention mechanism that runs on
CPU, and a count of the positions the layers compute (no padded one)."""

from __future__ import annotations

import random

import pytest
import torch
from esm.model.esm2 import ESM2
from torch import nn

from esm2_batch.models import esm2_fast as engine
from esm2_batch.models import varlen
from esm2_batch.models.esm2_fast import FastESM2
from esm2_batch.models.varlen import Packing, attention_for, host_index
from tests.fakes.tiny_esm import build_random_esm2
from tests.models.test_esm2_fast import (
    AMINO,
    LENGTH_MIXES,
    fair_states,
    states_tolerance,
    tokens_of,
)
from tests.tolerance import low_precision_tolerance

CASES = [*((mix, "segments") for mix in LENGTH_MIXES), ("padded", "nested"),
         ("masked_unknown", "nested")]
"""(length mix, attention): every mix with the CPU's mechanism, two with SDPA over nested
jagged tensors (the CUDA default, 60x slower on CPU); "flash" needs CUDA and flash-attn."""


def packed(module: ESM2, tokens: torch.Tensor) -> tuple[torch.Tensor, Packing, torch.Tensor]:
    """fair-esm's padded (B, T) batch as the engine's stream: (N,) tokens, its packing,
    and the (B, T) mask of real positions (to read fair-esm's states at the same rows)."""
    real = tokens.ne(module.padding_idx)
    lengths = real.sum(1).tolist()
    return tokens[real].to(torch.int32), Packing.build(lengths, torch.device("cpu")), real


@pytest.mark.parametrize(("mix", "attention"), CASES)
def test_packed_matches_fair_esm_every_layer_and_position(
    pair: tuple[ESM2, FastESM2], mix: str, attention: varlen.Attention
) -> None:
    module, fast = pair
    tokens, _ = tokens_of(module, LENGTH_MIXES[mix])
    stream, packing, real = packed(module, tokens)
    layers = tuple(range(module.num_layers, -1, -1))  # every layer, deepest first
    got = fast.forward_packed(stream, packing, layers, attention=attention)
    assert got.shape == (len(layers), packing.tokens, module.embed_dim)
    for k, layer in enumerate(layers):
        want = fair_states(module, tokens, layer)[real]  # (N, E): real positions only
        assert (got[k] - want).abs().max().item() <= states_tolerance(module, layer), layer
        one = fast.forward_packed(stream, packing, (layer,), attention=attention)[0]
        assert torch.equal(one, got[k])  # one layer (no copy) or several: the same numbers


def test_packed_equals_the_padded_path(pair: tuple[ESM2, FastESM2]) -> None:
    module, fast = pair
    tokens, _ = tokens_of(module, LENGTH_MIXES["several_chunks"] + LENGTH_MIXES["padded"])
    stream, packing, real = packed(module, tokens)
    got = fast.forward_packed(stream, packing, (module.num_layers,))[0]
    want = fast(tokens, skip_padding=True)[real]
    assert (got - want).abs().max().item() <= states_tolerance(module, module.num_layers)


def test_embeddings_bit_identical_to_the_padded_path(pair: tuple[ESM2, FastESM2]) -> None:
    module, fast = pair
    tokens, _ = tokens_of(module, LENGTH_MIXES["masked_unknown"])
    stream, packing, real = packed(module, tokens)
    padding = tokens.eq(module.padding_idx)
    assert torch.equal(fast.embed_packed(stream, packing), fast.embed(tokens, padding)[real])


def test_cpu_pieces_change_nothing(
    pair: tuple[ESM2, FastESM2], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, fast = pair
    tokens, _ = tokens_of(module, LENGTH_MIXES["several_chunks"] + LENGTH_MIXES["padded"])
    stream, packing, _ = packed(module, tokens)
    assert len(packing.pieces(engine.CPU_CHUNK_TOKENS)) > 1
    pieced = fast.forward_packed(stream, packing, (module.num_layers, 1))
    monkeypatch.setattr(engine, "CPU_CHUNK_TOKENS", 10**9)
    whole = fast.forward_packed(stream, packing, (module.num_layers, 1))
    assert (whole - pieced).abs().max().item() <= states_tolerance(module, module.num_layers)


def test_no_padded_position_is_computed() -> None:
    """One 1,022-residue protein and thirty of 50: every LayerNorm and linear layer of
    every block sees exactly the 1,024 + 30 * 52 real tokens (a padded batch: 31 x 1,024)."""
    module = build_random_esm2(num_layers=2, embed_dim=32, heads=2).eval()
    fast = FastESM2.from_fair_esm(module)
    rng = random.Random(0)
    sequences = ["".join(rng.choices(AMINO, k=1022))]
    sequences += ["".join(rng.choices(AMINO, k=50)) for _ in range(30)]
    tokens, _ = tokens_of(module, sequences)
    stream, packing, real = packed(module, tokens)
    seen: dict[str, int] = {}

    def count(name: str) -> object:
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            seen[name] = seen.get(name, 0) + inputs[0].shape[0]
        return hook

    handles = [sub.register_forward_pre_hook(count(name))  # type: ignore[arg-type]
               for name, sub in fast.layers.named_modules()
               if isinstance(sub, nn.Linear | nn.LayerNorm)]
    try:
        got = fast.forward_packed(stream, packing, (2,))[0]
    finally:
        for handle in handles:
            handle.remove()
    assert tokens.numel() == 31 * 1024 and packing.tokens == 1024 + 30 * 52
    assert len(seen) == 2 * 4  # ln1, qkv, ln2, fc1 of each block (out, fc2: addmm_ below)
    assert set(seen.values()) == {packing.tokens}
    want = fast(tokens, layer=2, skip_padding=True)[real]  # fair-esm's: tests above
    assert (got - want).abs().max().item() <= states_tolerance(module, 2)


def test_half_precision_packed_close_to_fp32_fair_esm() -> None:
    module = build_random_esm2(num_layers=2, embed_dim=64, heads=4).eval()
    tokens, _ = tokens_of(module, LENGTH_MIXES["padded"])
    want = fair_states(module, tokens, 2)
    stream, packing, real = packed(module, tokens)
    fast = FastESM2.from_fair_esm(module.to(torch.bfloat16))
    got = fast.forward_packed(stream, packing, (2,))[0]
    assert got.dtype == torch.bfloat16
    limit = low_precision_tolerance(torch.bfloat16, depth=2,
                                    magnitude=float(want[real].abs().max()))
    assert (got.float() - want[real]).abs().max().item() <= limit


def test_packing_index() -> None:
    index = host_index((3, 1, 2))
    assert index.tolist() == [0, 1, 2, 0, 0, 1,  0, 0, 0, 1, 2, 2,  0, 3, 4, 6]
    packing = Packing.build([3, 1, 2, 4], torch.device("cpu"))
    pieces = packing.pieces(4)
    assert [(rows.start, rows.stop) for rows, _ in pieces] == [(0, 4), (4, 10)]
    rest = pieces[1][1]
    assert rest.lengths == (2, 4) and rest.offsets == (0, 2, 6)
    assert rest.cu_seqlens.tolist() == [0, 2, 6] and rest.segments.tolist() == [0] * 2 + [1] * 4
    assert rest.positions.tolist() == [0, 1, 0, 1, 2, 3]
    with pytest.raises(ValueError):
        Packing.build([2, 0], torch.device("cpu"))


def test_attention_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    assert attention_for(torch.device("cpu"), torch.float16) == "segments"
    monkeypatch.setattr(varlen, "flash_attn_available", lambda: False)
    assert attention_for(cuda, torch.float16) == "nested"
    monkeypatch.setattr(varlen, "flash_attn_available", lambda: True)
    assert attention_for(cuda, torch.bfloat16) == "flash"
    assert attention_for(cuda, torch.float32) == "nested"  # flash-attn has no fp32 kernel
