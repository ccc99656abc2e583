"""ESM C (ESM Cambrian: 300M, 600M) in one readable module, without the ``esm`` package.

The PyPI package ``esm`` (ESM3 / ESM C) installs a top-level module named ``esm``, which
collides with fair-esm, and needs Python >= 3.12, so it is never a dependency. ESM C is a
plain pre-norm Transformer encoder; this file is the whole forward pass, written from the
reference implementation (Biohub/esm, formerly evolutionaryscale/esm, MIT licence:
``esm/models/esmc.py``, ``esm/layers/{attention,blocks,rotary,transformer_stack}.py``)::

    tokens (B, T)                    ESM2's ids: <cls>=0 <pad>=1 <eos>=2 <unk>=3 <mask>=32
    x = embed(tokens)                (B, T, d)                      vocab 64
    n_layers x block, s = sqrt(n_layers / 36):
        x += attn(x) / s             LayerNorm(d)+Linear(d, 3d) -> q, k, v; q and k get a
                                     LayerNorm(d, no bias) over the full width, then rotary
                                     (rotate-half, base 1e4, head 64, fp32 positions from 0
                                     at BOS); SDPA with the default scale; Linear(d, d)
        x += ffn(x) / s              LayerNorm(d), Linear(d, 2h), silu(x1) * x2, Linear(h, d)
    LayerNorm(d, no bias)            the "embeddings" the reference returns

No Linear has a bias; h = 8/3 d rounded up to a multiple of 256. Padding keys are masked,
so real positions never see padding and a sequence's states are the same alone or padded
in a batch. The mask is a (B, 1, 1, T) key mask, as transformers' EsmcModel uses, not the
reference's (B, 1, T, T) "padding attends only to padding": real positions are identical
under both, padding positions (never pooled) differ, and the key mask costs B*T bytes
instead of B*T*T (134 MB for 32 x 2048 tokens) and lets SDPA use its fused kernels.

Layers (``forward(tokens, layer=...)``), as the project numbers ESM2's: 0 is the token
embedding, k in 1..n-1 is the residual stream after block k (the reference's
``hidden_states[k - 1]``), and n (the default, or -1) is the post-final-LayerNorm output,
the reference's ``embeddings``. The last block's pre-norm output is not offered, exactly
as fair-esm's ``repr_layers`` has no pre-norm last layer either.

Weights load strictly (every parameter present, nothing unknown, every shape right, each
failure one `ModelError` line) from the original layout or the Hugging Face one
(esmc_weights.py reads both), with the config inferred from shapes. The module's
parameter names are the original layout's, so that file loads as it is. Heads are d / 64
(every ESM C has 64-wide heads) unless a ``config.json`` says otherwise.

Rotary tables are built in fp32 on every call (T x 32 values), then cast, so a bf16/fp16
model keeps exact positions and there is no cache to go stale.

Attribution and licences: ESM C was created by EvolutionaryScale, now part of Biohub
(Chan Zuckerberg Biohub). This module is an independent re-implementation written from the
reference code in Biohub/esm (MIT licence) and ships no weights. The weights carry the
licence of the repository they come from: Biohub's Hugging Face releases (biohub/ESMC-300M,
biohub/ESMC-600M) state MIT at the time of writing; the original December 2024 releases by
EvolutionaryScale (esmc_300m_2024_12, esmc_600m_2024_12) were published under the Cambrian
Open License (300M) and the Cambrian Non-Commercial License (600M). Check the model card.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from esm2_batch.errors import InputError, ModelError, name_some
from esm2_batch.models.esmc_weights import read_esmc_state
from esm2_batch.models.rotary import ROTARY_BASE, half_split_tables, rotary_inv_freq
from esm2_batch.models.weights import compare_keys, wrong_shape

Tensor = torch.Tensor

HEAD_DIM = 64
VOCAB_SIZE = 64
LAYER_NORM_EPS = 1e-5
CONTEXT_TOKENS = 2048
"""Training context, BOS and EOS included (2046 residues)."""
BOS_IDX, PAD_IDX, EOS_IDX, MASK_IDX = 0, 1, 2, 32
"""Same ids as fair-esm's ESM2 alphabet, so ESM2's tokenization serves ESM C unchanged."""

_ORIGINAL_BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class ESMCConfig:
    """The shape of an ESM C; everything else is fixed by the architecture."""

    d_model: int
    n_heads: int
    n_layers: int
    ffn_hidden: int
    vocab_size: int = VOCAB_SIZE
    rotary_base: float = ROTARY_BASE

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def residue_scale(self) -> float:
        """Each residual branch is divided by this (ESM3's depth scaling)."""
        return math.sqrt(self.n_layers / 36)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Tensor], *, n_heads: int | None = None,
        rotary_base: float = ROTARY_BASE,
    ) -> ESMCConfig:
        """Infer the config from an original-layout state dict's shapes (KeyError when the
        keys it reads are absent, ValueError when the width does not split into heads)."""
        vocab, d_model = state["embed.weight"].shape
        blocks = {int(m.group(1)) for key in state if (m := _ORIGINAL_BLOCK.match(key))}
        ffn_hidden = state["transformer.blocks.0.ffn.3.weight"].shape[1]
        heads = n_heads if n_heads is not None else d_model // HEAD_DIM
        if heads <= 0 or d_model % heads:
            raise ValueError(f"width {d_model} does not split into {heads} heads")
        return cls(d_model=d_model, n_heads=heads, n_layers=len(blocks), ffn_hidden=ffn_hidden,
                   vocab_size=vocab, rotary_base=rotary_base)


def ffn_hidden_size(d_model: int) -> int:
    """The SwiGLU width: 8/3 d rounded up to a multiple of 256 (the reference's rule)."""
    return int(((8 / 3) * d_model + 255) // 256 * 256)


ESMC_SIZES: dict[str, ESMCConfig] = {
    "300M": ESMCConfig(d_model=960, n_heads=15, n_layers=30, ffn_hidden=ffn_hidden_size(960)),
    "600M": ESMCConfig(d_model=1152, n_heads=18, n_layers=36, ffn_hidden=ffn_hidden_size(1152)),
}
"""The released open models (for documentation and checks: loading infers from shapes)."""


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """silu(first half) * second half: the gate is the first half of ffn.1's output."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)  # (..., h) each
        return F.silu(gate) * up


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with full-width q/k LayerNorms and rotary."""

    def __init__(self, config: ESMCConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.layernorm_qkv = nn.Sequential(nn.LayerNorm(d, eps=LAYER_NORM_EPS),
                                           nn.Linear(d, 3 * d, bias=False))
        self.out_proj = nn.Linear(d, d, bias=False)
        self.q_ln = nn.LayerNorm(d, eps=LAYER_NORM_EPS, bias=False)
        self.k_ln = nn.LayerNorm(d, eps=LAYER_NORM_EPS, bias=False)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        """(B, T, d) -> (B, T, d); `mask` (B, 1, 1, T) is True at the keys that may be seen."""
        q, k, v = self.layernorm_qkv(x).chunk(3, dim=-1)  # (B, T, d) each
        q, k = self.q_ln(q), self.k_ln(k)
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)) for t in (q, k, v))  # (B, T, H, D)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)  # (B, H, T, D)
        projected: Tensor = self.out_proj(out.transpose(1, 2).flatten(2))  # (B, T, d)
        return projected


class Block(nn.Module):
    """x += attn(x) / s; x += ffn(x) / s."""

    def __init__(self, config: ESMCConfig) -> None:
        super().__init__()
        d, h = config.d_model, config.ffn_hidden
        self.scale = config.residue_scale
        self.attn = Attention(config)
        self.ffn = nn.Sequential(nn.LayerNorm(d, eps=LAYER_NORM_EPS),
                                 nn.Linear(d, 2 * h, bias=False), SwiGLU(),
                                 nn.Linear(h, d, bias=False))

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        attended: Tensor = self.attn(x, rotary, mask)
        x = x + attended / self.scale
        fed: Tensor = self.ffn(x)
        return x + fed / self.scale


class Transformer(nn.Module):
    """The block stack and the final bias-free LayerNorm (named as in the original file)."""

    def __init__(self, config: ESMCConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS, bias=False)


class ESMC(nn.Module):
    """ESM C's encoder: (B, T) token ids -> (B, T, d) states at a chosen layer."""

    padding_idx = PAD_IDX
    cls_idx = BOS_IDX
    eos_idx = EOS_IDX
    mask_idx = MASK_IDX

    def __init__(self, config: ESMCConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.transformer = Transformer(config)

    @property
    def embed_dim(self) -> int:
        return self.config.d_model

    @property
    def num_layers(self) -> int:
        return self.config.n_layers

    def forward(self, tokens: Tensor, *, layer: int | None = None) -> Tensor:
        """States after `layer` (see the module docstring: 0 = embeddings, n or None or -1 =
        post-final-norm), computing no block above it. Padding is where tokens == 1."""
        return self.forward_layers(tokens, (self.num_layers if layer is None else layer,))[0]

    def forward_layers(self, tokens: Tensor, layers: tuple[int, ...]) -> Tensor:
        """(n, B, T, d) states after each of `layers`, from one pass that stops at the
        deepest of them (several layers cost one forward, not several)."""
        depths = [resolve_layer(layer, self.num_layers) for layer in layers]
        x: Tensor = self.embed(tokens)  # (B, T, d)
        rotary = rotary_tables(tokens.shape[1], self.config, device=x.device, dtype=x.dtype)
        mask = padding_mask(tokens)
        taken = {0: x} if 0 in depths else {}  # only what was asked for stays alive
        for depth, block in enumerate(self.transformer.blocks[:max(depths)], start=1):
            x = block(x, rotary, mask)  # a new tensor: earlier depths stay as they were
            if depth in depths:
                taken[depth] = self.transformer.norm(x) if depth == self.num_layers else x
        return torch.stack([taken[depth] for depth in depths])


class Trunk(Protocol):
    """What `TrunkEncoder` needs of a network: ESM C, and ESM3 built on ESM C's blocks."""

    @property
    def embed_dim(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    def forward_layers(self, tokens: Tensor, layers: tuple[int, ...]) -> Tensor: ...


@dataclass(frozen=True, slots=True)
class TrunkEncoder:
    """ESM C or ESM3 as an `Encoder`: the network's states, zeroed at padding as the ESM2
    engines do (padded positions are never pooled; zeros make every encoder agree there).
    Both take ESM2's token ids and a 2,048-token context."""

    module: Trunk
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def embed_dim(self) -> int:
        return self.module.embed_dim

    @property
    def num_layers(self) -> int:
        return self.module.num_layers

    @property
    def max_residues(self) -> int:
        return CONTEXT_TOKENS - 2

    def __call__(self, tokens: Tensor, *, layer: int) -> Tensor:
        """(B, T) tokens -> (B, T, d) states after `layer` (0 = embeddings)."""
        return self.states(tokens, layers=(layer,))[0]

    def states(self, tokens: Tensor, *, layers: tuple[int, ...]) -> Tensor:
        """(n, B, T, d) states after each of `layers`, from one forward."""
        states: Tensor = self.module.forward_layers(tokens, layers)
        return states.masked_fill(tokens.eq(PAD_IDX)[None, :, :, None], 0.0)


def resolve_layer(layer: int | None, num_layers: int) -> int:
    """The absolute layer in 0..n: None is n, negatives count from n + 1 (fair-esm's rule)."""
    if layer is None:
        return num_layers
    if not -(num_layers + 1) <= layer <= num_layers:
        raise InputError(f"layer {layer} out of range for a {num_layers}-layer ESM C "
                         f"(use 0..{num_layers}, or -1 for the last)")
    return layer % (num_layers + 1)


def padding_mask(tokens: Tensor) -> Tensor | None:
    """(B, 1, 1, T) True at real keys (every query sees only them); None without padding,
    so SDPA can take its fastest kernel. BOS is never padding, so no row is all False."""
    real = tokens.ne(PAD_IDX)  # (B, T)
    if bool(real.all()):
        return None
    return real[:, None, None, :]


def rotary_tables(
    length: int, config: ESMCConfig, *, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (1, T, 1, D), computed in fp32 from position 0, then cast."""
    inv_freq = rotary_inv_freq(config.head_dim, config.rotary_base, device=device)  # (D/2,)
    cos, sin = half_split_tables(inv_freq, length, dtype)  # (T, D) each
    return cos[None, :, None, :], sin[None, :, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-NeoX rotary on (B, T, H, D): x * cos + rotate_half(x) * sin."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_esmc(path: str | os.PathLike[str]) -> ESMC:
    """An ESM C in eval mode, float32 on the CPU, from any accepted source:

    an original ``.pth`` state dict; a ``.safetensors``/``.bin`` file in either layout; a
    Hugging Face folder (``config.json`` + weights) or the original hub folder
    (``data/weights/*.pth``); a hub id found in the local HF cache (never downloaded).
    """
    state, n_heads, rotary_base, where = read_esmc_state(path)
    try:
        config = ESMCConfig.from_state_dict(state, n_heads=n_heads, rotary_base=rotary_base)
    except KeyError as exc:
        raise ModelError(f"cannot load {where}: not an ESM C checkpoint (no {exc})") from None
    except ValueError as exc:
        raise ModelError(f"cannot load {where}: {exc}") from None
    with torch.device("meta"):
        module = ESMC(config)  # no memory until the real tensors are assigned
    check_state(module, state, where)
    module.load_state_dict(state, strict=True, assign=True)
    return module.float().eval()


def check_state(module: ESMC, state: Mapping[str, Tensor], where: Path) -> None:
    """Strict key and shape check against `module`, as one-line `ModelError`s."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    missing, unknown = compare_keys(state, expected)
    if missing or unknown:
        what = f"missing {name_some(missing)}" if missing else f"unexpected {name_some(unknown)}"
        raise ModelError(f"cannot load {where}: not an ESM C checkpoint ({what})")
    if found := wrong_shape(state, expected):
        name, shape, needed = found
        raise ModelError(f"cannot load {where}: {name} has shape {shape}, "
                         f"the inferred {module.num_layers}-layer ESM C needs {needed}")
