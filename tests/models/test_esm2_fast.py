"""FastESM2 against fair-esm's own ESM2.forward on tiny random models, every layer."""

from __future__ import annotations

import random

import pytest
import torch
from esm.model.esm2 import ESM2
from esm.rotary_embedding import RotaryEmbedding

from esm2_batch.models import esm2_fast as engine
from esm2_batch.models.esm2_fast import FastESM2, interleave_pairs, rotary_table, rotate_
from esm2_batch.models.rotary import rotary_inv_freq
from tests.fakes.tiny_esm import build_random_esm2
from tests.tolerance import tolerance

AMINO = "ACDEFGHIKLMNPQRSTVWY"

LENGTH_MIXES: dict[str, list[str]] = {
    "padded": ["M", "MK", *("".join(random.Random(n).choices(AMINO, k=n)) for n in
                            (7, 38, 120, 301, 299))],
    "no_padding": ["".join(random.Random(i).choices(AMINO, k=50)) for i in range(4)],
    "masked_unknown": ["MKT<mask>AYIAK<mask>QR", "XXBZUOXACD", "M<unk>KV<mask>",
                       "<mask><mask><mask>", "ACDEFGHIKLMNPQRSTVWYX" * 6],
    "several_chunks": ["".join(random.Random(i).choices(AMINO, k=200 + 9 * i))
                       for i in range(8)],  # T = 265: 3 rows per 1024-token chunk
}


def states_tolerance(module: ESM2, layer: int) -> float:
    """fp32 in another summation order: reductions over the FFN width (4 * embed_dim) in
    each of the `layer` layers run (the embedding alone, layer 0, is one more rounding)."""
    return tolerance(torch.float32, terms=4 * module.embed_dim, depth=max(layer, 1))


def tokens_of(module: ESM2, sequences: list[str]) -> tuple[torch.Tensor, list[int]]:
    """fair-esm's own batch converter: (B, T) tokens and each row's residue count."""
    _, _, tokens = module.alphabet.get_batch_converter()([(str(i), s) for i, s in
                                                            enumerate(sequences)])
    lengths = ((tokens != module.padding_idx).sum(1) - 2).tolist()
    return tokens, lengths


def fair_states(module: ESM2, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return module(tokens, repr_layers=[layer])["representations"][layer]


@pytest.mark.parametrize("mix", LENGTH_MIXES)
def test_matches_fair_esm_every_layer_and_position(
    pair: tuple[ESM2, FastESM2], mix: str
) -> None:
    module, fast = pair
    tokens, lengths = tokens_of(module, LENGTH_MIXES[mix])
    assert (tokens == module.padding_idx).any() == (mix != "no_padding")
    for layer in range(module.num_layers + 1):
        want = fair_states(module, tokens, layer)
        got = fast(tokens, layer=layer)
        assert got.shape == want.shape and got.dtype == want.dtype
        limit = states_tolerance(module, layer)
        assert (got - want).abs().max().item() <= limit, layer  # padding included
        for row, n in enumerate(lengths):
            pooled = got[row, 1 : n + 1].mean(0) - want[row, 1 : n + 1].mean(0)
            assert pooled.abs().max().item() <= limit


def test_chunking_changes_nothing(
    pair: tuple[ESM2, FastESM2], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, fast = pair
    tokens, _ = tokens_of(module, LENGTH_MIXES["several_chunks"] + LENGTH_MIXES["padded"])
    padding = tokens == module.padding_idx
    assert len(fast.chunks(padding, trim=False)) > 1
    chunked = fast(tokens)
    monkeypatch.setattr(engine, "CPU_CHUNK_TOKENS", 10**9)
    assert len(fast.chunks(padding, trim=False)) == 1
    limit = states_tolerance(module, module.num_layers)  # other batch shapes, other kernels
    assert (fast(tokens) - chunked).abs().max().item() <= limit


@pytest.mark.parametrize("mix", ["padded", "several_chunks", "masked_unknown"])
def test_skip_padding_keeps_real_positions_and_zeroes_padding(
    pair: tuple[ESM2, FastESM2], mix: str
) -> None:
    module, fast = pair
    tokens, _ = tokens_of(module, LENGTH_MIXES[mix])
    padding = (tokens == module.padding_idx).unsqueeze(-1)
    for layer in (1, module.num_layers):
        want = fair_states(module, tokens, layer).masked_fill(padding, 0.0)
        got = fast(tokens, layer=layer, skip_padding=True)
        assert (got - want).abs().max().item() <= states_tolerance(module, layer)
        assert not got.masked_select(padding).any()
    if mix == "several_chunks":  # ascending lengths: the first chunks are really trimmed
        widths = [width for _, width in fast.chunks(padding[..., 0], trim=True)]
        assert widths[0] < widths[-1] == tokens.shape[1]


def test_uses_the_modules_rotary_frequencies(pair: tuple[ESM2, FastESM2]) -> None:
    module, fast = pair
    loaded = module.layers[-1].self_attn.rot_emb.inv_freq
    assert torch.equal(fast.inv_freq[-1], loaded) and fast.inv_freq.dtype == torch.float32
    assert not torch.equal(loaded, rotary_inv_freq(loaded.numel() * 2))


def test_default_layer_is_last_and_range_checked(pair: tuple[ESM2, FastESM2]) -> None:
    module, fast = pair
    tokens, _ = tokens_of(module, ["MKV", "MKVLA"])
    assert torch.equal(fast(tokens), fast(tokens, layer=module.num_layers))
    with pytest.raises(ValueError, match="layer"):
        fast(tokens, layer=module.num_layers + 1)


def test_weights_shared_and_left_untouched(pair: tuple[ESM2, FastESM2]) -> None:
    module, fast = pair
    before = {k: v.clone() for k, v in module.state_dict().items()}
    tokens, _ = tokens_of(module, LENGTH_MIXES["padded"])
    fast(tokens)  # updates its activations in place: never a weight
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert fast.layers[0].fc1.weight.data_ptr() == module.layers[0].fc1.weight.data_ptr()
    assert fast.embed_tokens.weight.data_ptr() == module.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in fast.parameters())


def test_fused_qkv_is_scaled_and_interleaved() -> None:
    module = build_random_esm2(num_layers=1, embed_dim=32, heads=2)
    fast = FastESM2.from_fair_esm(module)
    attention, e, d = module.layers[0].self_attn, 32, 16
    weight = fast.layers[0].qkv.weight  # (3E, E)
    order = interleave_pairs(d)
    assert order.tolist()[:4] == [0, 8, 1, 9]
    q_head1 = attention.q_proj.weight[d : 2 * d][order] * d**-0.5
    assert torch.equal(weight[d : 2 * d], q_head1)
    assert torch.equal(weight[e : e + d], attention.k_proj.weight[:d][order])
    assert torch.equal(weight[2 * e :], attention.v_proj.weight)


def test_rotary_angles_bit_identical_to_fair_esm() -> None:
    theirs = RotaryEmbedding(24)
    cos, sin = theirs._update_cos_sin_tables(torch.zeros(1, 1500, 24), seq_dimension=1)
    table = rotary_table(rotary_inv_freq(24), 1500)  # (T, D/2)
    assert torch.equal(table.real, cos[0, :, :12]) and torch.equal(table.imag, sin[0, :, :12])


def test_rotation_equals_fair_esm_rotate_half() -> None:
    x = torch.randn(3, 700, 16)  # (B, T, D) in fair-esm's half-split channel order
    cos, sin = RotaryEmbedding(16)._update_cos_sin_tables(x, seq_dimension=-2)
    want = x * cos + torch.cat((-x[..., 8:], x[..., :8]), dim=-1) * sin
    pairs = x[..., interleave_pairs(16)].clone()
    rotate_(pairs, rotary_table(rotary_inv_freq(16), 700))
    got = torch.empty_like(x)
    got[..., interleave_pairs(16)] = pairs
    # x * cos - y * sin: two products summed, of values up to max |x|
    limit = tolerance(torch.float32, terms=2, magnitude=float(x.abs().max()))
    assert (got - want).abs().max().item() <= limit


def test_half_precision_rotates_in_fp32() -> None:
    pairs = torch.randn(1, 1024, 16).half()
    rotary = rotary_table(rotary_inv_freq(16), 1024)
    want = pairs.float()
    rotate_(want, rotary)
    rotate_(pairs, rotary)  # positions above 256 would round in fp16 tables
    assert torch.equal(pairs, want.half())


def test_half_engine_close_to_fp32_fair_esm() -> None:
    module = build_random_esm2(num_layers=2, embed_dim=64, heads=4).eval()
    tokens, _ = tokens_of(module, LENGTH_MIXES["padded"])
    want = fair_states(module, tokens, 2)
    fast = FastESM2.from_fair_esm(module.to(torch.bfloat16))
    assert fast.inv_freq.dtype == torch.float32
    got = fast(tokens)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() < 0.1
