"""A fast ESM2 forward for embeddings, in one file: fair-esm's weights, fair-esm's numbers.

fair-esm's ``ESM2.forward`` serves training and contact prediction: every layer builds the
(B*H, T, T) attention-probability tensor by hand (bmm + softmax), q, k and v are three
projections in a (T, B, E) layout with copies and transposes around them, the rotary is
applied through ``cat``-based half rotations, and every layer and the LM head always run.
`FastESM2` computes the same function for inference with:

- one fused QKV ``Linear`` per layer, the q rows pre-multiplied by head_dim**-0.5 (fair-esm
  scales q before the rotary; the rotation is linear, so folding the scale into the
  weights changes only rounding, and nothing at all for power-of-two head dims);
- ``F.scaled_dot_product_attention`` on strided views of the QKV output: no copies, no
  transposes, no attention weights; a chunk without padding gets no mask (fair-esm drops
  it too), one with padding an additive -inf mask built once for all layers, and SDPA's
  output layout makes the head merge a free view;
- the rotary as one in-place complex multiply per layer: the q/k channels of every head
  are permuted at load time from fair-esm's half-split order (x1 | x2) into interleaved
  pairs (x1_0, x2_0, x1_1, x2_1, ...), so each rotated pair is one complex number. q and k
  get the same permutation, so q . k, and hence attention, is unchanged. The frequencies
  are the module's own, per layer (the published checkpoints carry fp16-rounded values,
  and fair-esm's forward uses them: recomputing them would move the rows), kept in fp32;
  the angles are fair-esm's fp32 products, and under fp16/bf16 the rotation itself runs
  in fp32 too (fair-esm casts its frequencies with the model: positions above 256 round);
- residual adds fused into the output projections (``addmm_`` into the residual stream),
  which the layers update in place;
- on CPU, the batch runs through the layers in chunks of whole sequences of about
  `CPU_CHUNK_TOKENS` tokens, so each chunk's activations stay in cache and the allocator
  reuses the same few blocks (rows are independent: no number changes); with
  ``skip_padding`` each chunk is also cut at its longest sequence, so the padding of a
  length-sorted batch is mostly never computed;
- and it stops at the requested layer: the layers above it and the LM head never run.

`forward_packed` is the unpadded path the embedder uses (models/varlen.py): a batch's
tokens as one [N, E] stream (no padding anywhere: every linear layer, LayerNorm, GELU and
rotary sees real tokens only), rotary angles by each token's position in its own
sequence, and attention per sequence without a mask (flash-attn's varlen kernel, SDPA
over nested jagged tensors, or per-sequence SDPA on the CPU: `varlen.attention_for`).
The padded `forward` stays for callers holding (B, T) batches.

In fp32 it matches ``ESM2.forward(tokens, repr_layers=[L])["representations"][L]`` to
~1e-6 (tests/models/test_esm2_fast.py), at padded positions too unless ``skip_padding``
asks for zeros there: token-dropout rescaling, padding zeroing and key masking are
fair-esm's. It is inference-only (``torch.inference_mode``). `FastEncoder` is the engine
behind the package's `Encoder` protocol (``load_model(..., engine="fast")``).

Shapes in comments: B batch, T tokens (BOS + residues + EOS + padding), E embed dim,
H heads, D head dim (E / H), F feed-forward dim (4E).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2
from torch import nn

from esm2_batch.models.fair_esm import MAX_RESIDUES, rotary_frequencies
from esm2_batch.models.rotary import rotary_angles, rotary_inv_freq
from esm2_batch.models.varlen import ATTEND, Attention, AttentionFn, Packing, attention_for

TOKEN_DROPOUT_RATIO = 0.15 * 0.8
"""fair-esm's training mask ratio: at inference embeddings are multiplied by 1 - 0.12 and
divided by one minus the row's observed <mask> ratio."""

CPU_CHUNK_TOKENS = 1024
"""Tokens per chunk on CPU (a chunk holds whole sequences: 1-2x this, or one longer row).
Measured on 2 Xeon cores, ESM2-35M: 1,024-token chunks ran 5-12% faster than whole
4,000-8,000-token batches (activations stay in cache, allocations stay below glibc's
mmap threshold, so no page faults), and 2-5% faster than 256- or 2,048-token chunks on
2 threads; per-layer Python overhead stays under 1% of a chunk's matmul time."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The shape of an ESM2 and the alphabet indices its forward needs."""

    num_layers: int
    embed_dim: int
    heads: int
    vocab_size: int
    padding_idx: int
    mask_idx: int
    token_dropout: bool
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def ffn_dim(self) -> int:
        return 4 * self.embed_dim

    @classmethod
    def of(cls, module: ESM2) -> EngineConfig:
        """The config of a fair-esm ESM2 module."""
        return cls(
            num_layers=module.num_layers, embed_dim=module.embed_dim,
            heads=module.attention_heads, vocab_size=module.alphabet_size,
            padding_idx=module.padding_idx, mask_idx=module.mask_idx,
            token_dropout=module.token_dropout,
            layer_norm_eps=module.emb_layer_norm_after.eps,
        )


class Block(nn.Module):
    """One pre-LayerNorm transformer layer: x += attn(ln1(x)); x += mlp(ln2(x))."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        e = config.embed_dim
        self.heads, self.head_dim = config.heads, config.head_dim
        self.ln1 = nn.LayerNorm(e, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(e, 3 * e)  # rows [q * D**-0.5 | k | v]; q, k pairs interleaved
        self.out = nn.Linear(e, e)
        self.ln2 = nn.LayerNorm(e, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(e, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, e)

    def forward(
        self, x: torch.Tensor, rotary: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, T, E) -> (B, T, E): the residual stream `x`, updated in place."""
        _add_linear_(x, self.attention(self.ln1(x), rotary, mask), self.out)
        return _add_linear_(x, F.gelu(self.fc1(self.ln2(x))), self.fc2)

    def forward_packed(
        self, x: torch.Tensor, rotary: torch.Tensor, attend: AttentionFn, packing: Packing
    ) -> torch.Tensor:
        """(N, E) packed residual stream, updated in place; `rotary` (N, D/2) complex is
        each token's rotation at its own position."""
        tokens = x.shape[0]
        qkv = self.qkv(self.ln1(x)).view(tokens, 3, self.heads, self.head_dim)  # (N, 3, H, D)
        rotate_(qkv[:, :2], rotary[:, None, None, :])  # q and k, in place
        _add_linear_(x, attend(qkv, packing).reshape(x.shape), self.out)  # (N, H, D) -> (N, E)
        return _add_linear_(x, F.gelu(self.fc1(self.ln2(x))), self.fc2)

    def attention(
        self, h: torch.Tensor, rotary: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, T, E) normed states -> (B, T, E) attention output, before out projection.

        `rotary` is (T, D/2) complex; `mask` (B, 1, 1, T) is -inf at padded keys and 0
        elsewhere (fair-esm's masked_fill before the softmax), or None.
        """
        batch, length, embed = h.shape
        qkv = self.qkv(h).view(batch, length, 3, self.heads, self.head_dim)  # (B, T, 3, H, D)
        rotate_(qkv[:, :, :2], rotary[:, None, None, :])  # q and k, in place
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return out.transpose(1, 2).reshape(batch, length, embed)  # (B, T, E), a view


def rotate_(pairs: torch.Tensor, rotary: torch.Tensor) -> None:
    """Rotate every interleaved (x1, x2) channel pair of `pairs` (..., D) in place by the
    complex64 `rotary` (broadcast over (..., D/2)): (x1 + i x2) * (cos + i sin), i.e.
    fair-esm's x * cos + rotate_half(x) * sin. Half-precision inputs rotate in fp32."""
    if pairs.dtype == torch.float32:
        torch.view_as_complex(torch.unflatten(pairs, -1, (-1, 2))).mul_(rotary)
        return
    wide = torch.view_as_complex(torch.unflatten(pairs.float(), -1, (-1, 2))) * rotary
    pairs.copy_(torch.view_as_real(wide).flatten(-2))


def _add_linear_(x: torch.Tensor, h: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """x += h @ W.T + b in place: (B, T, E) += (B, T, E_in) projected; returns x."""
    x.view(-1, x.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), linear.weight.t())
    return x.add_(linear.bias)


class FastESM2(nn.Module):
    """ESM2's encoder for embeddings: (B, T) tokens -> (B, T, E) states after a layer."""

    inv_freq: torch.Tensor  # (L, D/2) fp32 rotary frequencies, a buffer

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_after = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        inv_freq = rotary_inv_freq(config.head_dim).expand(config.num_layers, -1)
        self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)  # (L, D/2) fp32
        self.rotary_rows: tuple[int, ...] = (0,) * config.num_layers
        """Per layer, the first layer with the same frequencies: one table serves them."""

    @classmethod
    def from_fair_esm(cls, module: ESM2) -> FastESM2:
        """The engine for `module`, on its device and in its dtype.

        Every weight except the fused QKV projection is shared with `module`, not copied,
        so the pair costs one model's memory plus a quarter of the layers' weights. The
        rotary frequencies are the module's own, in fp32 (`fair_esm.rotary_frequencies`):
        exact even after an fp16 cast when the module has fair_esm's fp32 rotary installed.
        """
        config = EngineConfig.of(module)
        with torch.device("meta"):
            engine = cls(config)  # no memory allocated for weights about to be replaced
        engine.load_state_dict(convert_state_dict(module.state_dict(), config), assign=True)
        frequencies = rotary_frequencies(module)
        engine.inv_freq = frequencies.to(module.embed_tokens.weight.device)
        engine.rotary_rows = tuple(next(j for j in range(i + 1)
                                        if torch.equal(frequencies[j], frequencies[i]))
                                   for i in range(config.num_layers))
        return engine.eval().requires_grad_(False)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, *, layer: int | None = None, skip_padding: bool = False
    ) -> torch.Tensor:
        """(B, T) tokens -> (B, T, E) states after `layer` (0 = embeddings, default last),
        as fair-esm's ``forward(tokens, repr_layers=[layer])`` gives them.

        fair-esm also computes states at padded positions (meaningless, but defined); so
        does this by default. With `skip_padding` the columns past each chunk's longest
        sequence are not computed at all (~10% less work on a realistic length mix) and
        every padded position comes back as zeros; real positions are unchanged.
        """
        c = self.config
        layer = c.num_layers if layer is None else layer
        if not 0 <= layer <= c.num_layers:
            raise ValueError(f"layer must be in 0..{c.num_layers}, not {layer}")
        padding = tokens.eq(c.padding_idx)  # (B, T)
        x = self.embed(tokens, padding)  # (B, T, E)
        if layer == 0:
            return x
        rotary = rotary_table(self.inv_freq[:layer], tokens.shape[1])  # (l, T, D/2) complex64
        for rows, width in self.chunks(padding, trim=skip_padding):
            self._run_chunk(x[rows, :width], padding[rows, :width], rotary[:, :width], layer)
        x = self.ln_after(x) if layer == c.num_layers else x
        return x.masked_fill_(padding.unsqueeze(-1), 0.0) if skip_padding else x

    @torch.inference_mode()
    def forward_layers(
        self, tokens: torch.Tensor, layers: tuple[int, ...], *, skip_padding: bool = False
    ) -> torch.Tensor:
        """(n, B, T, E) states after each of `layers`, from one pass that stops at the
        deepest: each requested depth is copied out as the chunk passes it, so several
        layers cost one forward plus n copies (one layer: use `forward`, no copy).

        Positions `forward` would not compute (with `skip_padding`) are zeros."""
        c = self.config
        for layer in layers:
            if not 0 <= layer <= c.num_layers:
                raise ValueError(f"layer must be in 0..{c.num_layers}, not {layer}")
        padding = tokens.eq(c.padding_idx)  # (B, T)
        x = self.embed(tokens, padding)  # (B, T, E)
        out = x.new_zeros((len(layers), *x.shape))  # (n, B, T, E)
        for k in (k for k, layer in enumerate(layers) if layer == 0):
            out[k] = x
        top = max(layers)
        rotary = rotary_table(self.inv_freq[:top], tokens.shape[1])  # (l, T, D/2) complex64
        for rows, width in self.chunks(padding, trim=skip_padding):
            def tap(depth: int, work: torch.Tensor, rows: slice = rows, width: int = width
                    ) -> None:
                for k in (k for k, layer in enumerate(layers) if layer == depth):
                    out[k, rows, :width] = work
            self._run_chunk(x[rows, :width], padding[rows, :width], rotary[:, :width], top,
                            tap=tap)
        for k in (k for k, layer in enumerate(layers) if layer == c.num_layers):
            out[k] = self.ln_after(out[k])
        return out.masked_fill_(padding[None, :, :, None], 0.0) if skip_padding else out

    @torch.inference_mode()
    def forward_packed(
        self, tokens: torch.Tensor, packing: Packing, layers: tuple[int, ...],
        *, attention: Attention | None = None,
    ) -> torch.Tensor:
        """(N,) packed tokens (every sequence with its BOS and EOS, no padding) -> (n, N, E)
        states after each of `layers`, from one pass that stops at the deepest (one
        layer: no copy). Real positions equal `forward`'s; no padded position exists.

        `attention` picks the mechanism (default `varlen.attention_for` the device and
        dtype). On CPU the stream runs through the layers in groups of whole sequences of
        about `CPU_CHUNK_TOKENS` tokens (slices of the stream: no copy), as `forward` does."""
        c = self.config
        for layer in layers:
            if not 0 <= layer <= c.num_layers:
                raise ValueError(f"layer must be in 0..{c.num_layers}, not {layer}")
        weights = self.embed_tokens.weight
        attend = ATTEND[attention or attention_for(weights.device, weights.dtype)]
        x = self.embed_packed(tokens, packing)  # (N, E)
        top = max(layers)
        out = None if len(layers) == 1 else x.new_empty((len(layers), *x.shape))  # (n, N, E)
        if out is not None:
            for k in (k for k, layer in enumerate(layers) if layer == 0):
                out[k] = x
        tables = {row: rotary_table(self.inv_freq[row], packing.max_len)  # (T, D/2)
                  for row in set(self.rotary_rows[:top])}
        cpu = tokens.device.type == "cpu"
        for rows, part in packing.pieces(CPU_CHUNK_TOKENS if cpu else packing.tokens):
            rotary = {row: table.index_select(0, part.positions)  # (n, D/2) complex64
                      for row, table in tables.items()}
            work = x[rows]  # whole sequences: a contiguous view of the stream
            for depth, block in enumerate(cast(list[Block], self.layers[:top]), 1):
                block.forward_packed(work, rotary[self.rotary_rows[depth - 1]], attend, part)
                if out is not None:
                    for k in (k for k, layer in enumerate(layers) if layer == depth):
                        out[k, rows] = work
        if out is None:
            return (self.ln_after(x) if top == c.num_layers else x).unsqueeze(0)
        for k in (k for k, layer in enumerate(layers) if layer == c.num_layers):
            out[k] = self.ln_after(out[k])
        return out

    def embed_packed(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """(N,) -> (N, E) embeddings, `embed`'s token-dropout rescaling per sequence
        (the same operations on the same values: bit-identical at real positions)."""
        x: torch.Tensor = self.embed_tokens(tokens)  # (N, E)
        if self.config.token_dropout:
            masked = tokens.eq(self.config.mask_idx)  # (N,)
            x = x.masked_fill(masked.unsqueeze(-1), 0.0)
            counts = x.new_zeros(len(packing.lengths)).index_add_(
                0, packing.segments, masked.to(x.dtype))  # (B,) masked tokens
            observed = counts / packing.cu_seqlens.diff()  # (B,)
            x = x * (1 - TOKEN_DROPOUT_RATIO) / (1 - observed)[packing.segments, None]
        return x

    def embed(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, E) embeddings with fair-esm's token-dropout rescaling and
        zeroed padding, operation for operation."""
        x: torch.Tensor = self.embed_tokens(tokens)  # (B, T, E); fair-esm's embed_scale is 1
        if self.config.token_dropout:
            masked = tokens.eq(self.config.mask_idx)  # (B, T)
            x = x.masked_fill(masked.unsqueeze(-1), 0.0)
            observed = masked.sum(-1).to(x.dtype) / (~padding).sum(-1)  # (B,)
            x = x * (1 - TOKEN_DROPOUT_RATIO) / (1 - observed)[:, None, None]
        if padding.any():  # fair-esm multiplies by 1 - padding; by 1 it changes nothing
            x = x * (1 - padding.unsqueeze(-1).type_as(x))
        return x

    def chunks(self, padding: torch.Tensor, *, trim: bool) -> list[tuple[slice, int]]:
        """(rows, width) pieces of the (B, T) batch: on CPU, consecutive rows of at least
        `CPU_CHUNK_TOKENS` tokens (or one row), elsewhere the whole batch. The width is T,
        or with `trim` the extent of the piece's longest row (its last real token + 1)."""
        batch, length = padding.shape
        extent = [length] * batch
        if trim:
            positions = torch.arange(1, length + 1, device=padding.device)  # (T,)
            extent = positions.masked_fill(padding, 0).amax(-1).tolist()  # (B,)
        if padding.device.type != "cpu":
            return [(slice(0, batch), max(extent))]
        pieces, start = [], 0
        while start < batch:
            rows = math.ceil(CPU_CHUNK_TOKENS / max(1, extent[start]))  # never a sliver
            end = min(batch, start + rows)
            pieces.append((slice(start, end), max(extent[start:end])))
            start = end
        return pieces

    def _run_chunk(
        self, x: torch.Tensor, padding: torch.Tensor, rotary: torch.Tensor, layer: int,
        tap: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        """Run layers 1..`layer` on the (b, w, E) view `x` in place; `rotary` holds their
        (layer, w, D/2) tables. A trimmed view is not contiguous: it runs on a copy.
        `tap(depth, states)` sees the (b, w, E) states after each layer (to copy some)."""
        work = x if x.is_contiguous() else x.contiguous()
        mask = None  # fair-esm drops the mask when nothing is padded; SDPA is faster without
        if padding.any():  # additive, built once: SDPA would convert a bool mask every layer
            mask = torch.zeros(padding.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(padding, float("-inf"))[:, None, None, :]  # (b, 1, 1, w)
        for depth, (block, table) in enumerate(zip(self.layers[:layer], rotary, strict=True), 1):
            block(work, table, mask)
            if tap is not None:
                tap(depth, work)
        if work is not x:
            x.copy_(work)



@dataclass(frozen=True, slots=True)
class FastEncoder:
    """The fast engine as an `Encoder`: padded positions are skipped and come back as
    zeros (the reference engine zeroes them too), real positions are fair-esm's."""

    fast: FastESM2
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def embed_dim(self) -> int:
        return self.fast.config.embed_dim

    @property
    def num_layers(self) -> int:
        return self.fast.config.num_layers

    @property
    def max_residues(self) -> int:
        return MAX_RESIDUES

    def __call__(self, tokens: torch.Tensor, *, layer: int) -> torch.Tensor:
        """(B, T) tokens -> (B, T, E) states after `layer` (0 = embeddings)."""
        states: torch.Tensor = self.fast(tokens, layer=layer, skip_padding=True)
        return states

    def states(self, tokens: torch.Tensor, *, layers: tuple[int, ...]) -> torch.Tensor:
        """(n, B, T, E) states after each of `layers`, from one forward."""
        return self.fast.forward_layers(tokens, layers, skip_padding=True)


def rotary_table(inv_freq: torch.Tensor, length: int) -> torch.Tensor:
    """(..., T, D/2) complex64 rotations exp(i * t * inv_freq) for (..., D/2) fp32
    frequencies: the angles are fair-esm's (one fp32 product each), so in fp32 cos and
    sin are bit-identical to its tables."""
    angles = rotary_angles(inv_freq, length)  # (..., T, D/2)
    return torch.view_as_complex(torch.stack((angles.cos(), angles.sin()), dim=-1))


def interleave_pairs(head_dim: int) -> torch.Tensor:
    """(D,) channel order (0, D/2, 1, D/2 + 1, ...): fair-esm's rotary partners i and
    i + D/2 become neighbours, the real and imaginary parts of one complex number."""
    half = torch.arange(head_dim // 2)
    return torch.stack((half, half + head_dim // 2), dim=-1).flatten()


def convert_state_dict(
    fair: dict[str, torch.Tensor], config: EngineConfig
) -> dict[str, torch.Tensor]:
    """fair-esm's ESM2 state dict -> `FastESM2`'s; only the fused QKV tensors are new."""
    state = {
        "embed_tokens.weight": fair["embed_tokens.weight"],
        "ln_after.weight": fair["emb_layer_norm_after.weight"],
        "ln_after.bias": fair["emb_layer_norm_after.bias"],
    }
    for i in range(config.num_layers):
        state.update(_convert_layer(fair, f"layers.{i}.", config))
    return state


_SAME_WEIGHTS = {
    "ln1": "self_attn_layer_norm", "out": "self_attn.out_proj",
    "ln2": "final_layer_norm", "fc1": "fc1", "fc2": "fc2",
}
"""Our name -> fair-esm's, for the layer weights used unchanged."""


def _convert_layer(
    fair: dict[str, torch.Tensor], prefix: str, config: EngineConfig
) -> dict[str, torch.Tensor]:
    """One layer's weights: q (scaled), k and v fused into one (3E, E) projection."""
    state = {
        f"{prefix}{ours}.{p}": fair[f"{prefix}{theirs}.{p}"]
        for ours, theirs in _SAME_WEIGHTS.items() for p in ("weight", "bias")
    }
    scaling = config.head_dim**-0.5
    parts = [_projection(fair, f"{prefix}self_attn.q_proj", config, scale=scaling),
             _projection(fair, f"{prefix}self_attn.k_proj", config),
             _projection(fair, f"{prefix}self_attn.v_proj", config, interleave=False)]
    dtype = fair[f"{prefix}fc1.weight"].dtype
    state[f"{prefix}qkv.weight"] = torch.cat([w for w, _ in parts]).to(dtype)  # (3E, E)
    state[f"{prefix}qkv.bias"] = torch.cat([b for _, b in parts]).to(dtype)  # (3E,)
    return state


def _projection(
    fair: dict[str, torch.Tensor], name: str, config: EngineConfig,
    *, scale: float = 1.0, interleave: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An (E, E) projection and its bias in fp32, scaled, each head's rotary pairs
    interleaved (output rows are heads x head_dim)."""
    weight = fair[f"{name}.weight"].float() * scale  # (E, E)
    bias = fair[f"{name}.bias"].float() * scale  # (E,)
    if interleave:
        order = interleave_pairs(config.head_dim).to(weight.device)
        weight = weight.view(config.heads, config.head_dim, -1)[:, order].flatten(0, 1)
        bias = bias.view(config.heads, config.head_dim)[:, order].flatten()
    return weight, bias
