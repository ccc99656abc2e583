"""ESM3 (sequence track only) in one readable module, without the ``esm`` package.

ESM3 is ESM C's Transformer fed by a sum of seven track embeddings, with one geometric
attention layer in its first block. Given only a sequence, the other tracks take the
values the reference (EvolutionaryScale/esm 3.2.1, ``esm/models/esm3.py``: ``ESM3.encode``
then ``ESM3.logits(..., LogitsConfig(return_embeddings=True))``, which fills them in
``ESM3.forward``) gives them, so they are constants per position::

    tokens (B, T)                 ESM2's ids (ESM3 shares them): <cls>=0 <pad>=1 <eos>=2
    x = sequence_embed(tokens)                                    (B, T, d)   vocab 64
      + plddt_projection(rbf16(1.0))          average pLDDT 1: one (d,) vector
      + structure_per_res_plddt_projection(rbf16(0.0))   per-residue pLDDT 0
      + structure_tokens_embed(s)             s = MASK (4096) at residues, BOS/EOS/PAD/
                                              CHAINBREAK (4098/4097/4099/4100) at those
      + ss8_embed[0] + sasa_embed[0]          both tracks padded (token 0)
      + concat_k function_embed[k][0]         8 tables of width d/8, token 0 (row 0 is looked
                                              up as it is: padding_idx only stops gradients)
      + 0                                     residue annotations: token 0, which the
                                              EmbeddingBag(padding_idx=0) skips
    n_layers x block (esmc.Block: LayerNorm+qkv, q/k LayerNorms, rotary, SDPA; SwiGLU;
        each branch / sqrt(n_layers / 36)); block 0 also has geometric attention, which
        without coordinates sees no frame (all NaN), and ``mask_and_zero_frameless``
        zeroes its output: it adds exactly 0, so it is not computed (its weights are
        checked and dropped)
    "embeddings" = the last block's output BEFORE the final LayerNorm (ESM C's are after)

rbf16(v) = exp(-((v - linspace(0, 1, 16)) * 16) ** 2), as ``esm.utils.misc.rbf``.

Layers, as the project numbers them: 0 is the summed input embedding, k in 1..n the
residual stream after block k; n (the default, -1) is what the reference returns as
``embeddings`` and what the patched pipeline of EvolutionaryScale's users saves
(``embedding[0, 1:-1]`` per residue). The final LayerNorm and the output heads are not
used. Padding keys are masked (the reference's ``logits()`` passes no ``sequence_id``, so
its padded batches would attend to padding; one sequence at a time it is the same as
here).

Weights: ``esm3_sm_open_v1.pth`` as published in EvolutionaryScale's esm3-sm-open-v1 model
repository (a torch-saved state dict, read with ``weights_only=True``), that repository's
folder (``data/weights/*.pth``), or its hub id in the local HF cache. Strict: every key of
the original layout present (output heads and geometric attention included), nothing
else, every shape right; the config comes from the shapes (head width 64: the head count
is not stored in the weights). Context: the local code never truncates; the hosted API
caps ESM3 at 2,048 tokens, taken here as its context (2,046 residues).

Attribution and licence: ESM3 was created by EvolutionaryScale (now part of Biohub). This
module is an independent re-implementation written from the reference code (the ``esm``
package, MIT licence for the code) and ships no weights. The open weights
(esm3-sm-open-v1) are published under EvolutionaryScale's Cambrian Non-Commercial
License Agreement: non-commercial use only; check the model card.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from esm2_batch.errors import ModelError, name_some
from esm2_batch.models.esmc import (
    Block,
    ESMCConfig,
    padding_mask,
    resolve_layer,
    rotary_tables,
)
from esm2_batch.models.weights import (
    compare_keys,
    load_weights_only,
    locate,
    weight_names,
    wrong_shape,
)

Tensor = torch.Tensor

HEAD_DIM = 64
VOCAB_SIZE = 64
CONTEXT_TOKENS = 2048
"""The hosted API's cap, BOS and EOS included (the local code has none)."""
BOS_IDX, PAD_IDX, EOS_IDX, CHAINBREAK_IDX = 0, 1, 2, 31
STRUCTURE_MASK, STRUCTURE_EOS, STRUCTURE_BOS, STRUCTURE_PAD, STRUCTURE_CHAINBREAK = (
    4096, 4097, 4098, 4099, 4100)
"""The structure track's special tokens (VQ-VAE codebook of 4096, then the specials)."""
STRUCTURE_VOCAB, SS8_VOCAB, SASA_VOCAB = 4096 + 5, 8 + 3, 16 + 3
FUNCTION_TABLES, FUNCTION_VOCAB, RESIDUE_VOCAB = 8, 260, 1478
RBF_BINS = 16
SEQUENCE_KEY = "encoder.sequence_embed.weight"
"""The key that marks a state dict as ESM3's original layout."""
_BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.")
_HEADS = {"sequence_head": VOCAB_SIZE, "structure_head": 4096, "ss8_head": SS8_VOCAB,
          "sasa_head": SASA_VOCAB, "function_head": FUNCTION_VOCAB * FUNCTION_TABLES,
          "residue_head": RESIDUE_VOCAB}
"""Output heads (unused here, checked): RegressionHead(d, out) = Linear, GELU, LayerNorm, Linear."""


@dataclass(frozen=True, slots=True)
class ESM3Config:
    """The shape of an ESM3: ESM C's block config plus the geometric heads of block 0."""

    blocks: ESMCConfig
    v_heads: int

    @property
    def d_model(self) -> int:
        return self.blocks.d_model


def rbf16(value: float, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(16,) radial basis encoding of a value in [0, 1] (``esm.utils.misc.rbf``)."""
    values = torch.tensor(value, device=device, dtype=dtype)
    centers = torch.linspace(0.0, 1.0, RBF_BINS, device=device, dtype=dtype)
    z = (values.unsqueeze(-1) - centers) / (1.0 / RBF_BINS)
    return torch.exp(-(z**2))


class Inputs(nn.Module):
    """The track embeddings a sequence-only input uses (the original ``encoder.*``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.sequence_embed = nn.Embedding(VOCAB_SIZE, d)
        self.plddt_projection = nn.Linear(RBF_BINS, d)
        self.structure_per_res_plddt_projection = nn.Linear(RBF_BINS, d)
        self.structure_tokens_embed = nn.Embedding(STRUCTURE_VOCAB, d)
        self.ss8_embed = nn.Embedding(SS8_VOCAB, d)
        self.sasa_embed = nn.Embedding(SASA_VOCAB, d)
        self.function_embed = nn.ModuleList(
            nn.Embedding(FUNCTION_VOCAB, d // FUNCTION_TABLES) for _ in range(FUNCTION_TABLES))

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, T) sequence tokens -> (B, T, d), summed in the reference's order."""
        x: Tensor = self.sequence_embed(tokens)
        dtype, device = x.dtype, x.device
        plddt = self.plddt_projection(rbf16(1.0, device=device, dtype=dtype))  # (d,)
        per_residue = self.structure_per_res_plddt_projection(
            rbf16(0.0, device=device, dtype=dtype)[None, None])  # (1, 1, d)
        structure = torch.full_like(tokens, STRUCTURE_MASK)
        for token, special in ((BOS_IDX, STRUCTURE_BOS), (PAD_IDX, STRUCTURE_PAD),
                               (EOS_IDX, STRUCTURE_EOS), (CHAINBREAK_IDX, STRUCTURE_CHAINBREAK)):
            structure = structure.masked_fill(tokens.eq(token), special)
        function = torch.cat([self._row0(table) for table in self.function_embed])  # (d,)
        x = x + plddt
        x = x + per_residue
        x = x + self.structure_tokens_embed(structure)
        x = x + self.ss8_embed.weight[0]
        x = x + self.sasa_embed.weight[0]
        return x + function


    @staticmethod
    def _row0(table: nn.Module) -> Tensor:
        """Row 0 of an embedding table (token 0, looked up as it is)."""
        assert isinstance(table, nn.Embedding)
        row: Tensor = table.weight[0]
        return row


class Transformer(nn.Module):
    """The block stack (named as in the original file; the final norm is not used)."""

    def __init__(self, config: ESMCConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))


class ESM3(nn.Module):
    """ESM3's sequence-only encoder: (B, T) token ids -> (B, T, d) states at a layer."""

    padding_idx = PAD_IDX

    def __init__(self, config: ESM3Config) -> None:
        super().__init__()
        self.config = config
        self.encoder = Inputs(config.d_model)
        self.transformer = Transformer(config.blocks)

    @property
    def embed_dim(self) -> int:
        return self.config.d_model

    @property
    def num_layers(self) -> int:
        return self.config.blocks.n_layers

    def forward(self, tokens: Tensor, *, layer: int | None = None) -> Tensor:
        """States after `layer` (module docstring: 0 = input embedding, n or None or -1 =
        the reference's ``embeddings``), computing no block above it."""
        return self.forward_layers(tokens, (self.num_layers if layer is None else layer,))[0]

    def forward_layers(self, tokens: Tensor, layers: tuple[int, ...]) -> Tensor:
        """(n, B, T, d) states after each of `layers`, from one pass."""
        depths = [resolve_layer(layer, self.num_layers) for layer in layers]
        x = self.encoder(tokens)  # (B, T, d)
        rotary = rotary_tables(tokens.shape[1], self.config.blocks, device=x.device,
                               dtype=x.dtype)
        mask = padding_mask(tokens)
        taken = {0: x} if 0 in depths else {}
        for depth, block in enumerate(self.transformer.blocks[:max(depths)], start=1):
            x = block(x, rotary, mask)
            if depth in depths:
                taken[depth] = x
        return torch.stack([taken[depth] for depth in depths])



# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def is_esm3_source(path: str | os.PathLike[str]) -> bool:
    """Whether `path` (a .pth/.pt file or the model repository's folder) holds ESM3's
    original weights; never raises (for choosing a backend)."""
    try:
        source = _weights_file(Path(path).expanduser())
        return source is not None and SEQUENCE_KEY in weight_names(source)
    except Exception:  # a probe: anything unreadable is simply not ESM3
        return False


def load_esm3(path: str | os.PathLike[str]) -> ESM3:
    """An ESM3 in eval mode, float32 on the CPU, from an original ``.pth``, the model
    repository's folder (``data/weights/*.pth``) or its hub id in the local HF cache."""
    found = locate(path)
    source = None if found is None else _weights_file(found)
    if source is None:
        raise ModelError(f"ESM3 weights not found: {Path(path).expanduser()} (pass "
                         f"esm3_sm_open_v1.pth, the esm3-sm-open-v1 folder, or its hub id "
                         f"if it is in the HF cache)")
    state = load_weights_only(source)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"cannot load {source}: not a state dict of tensors")
    config = _config(state, source)
    expected = expected_shapes(config)
    missing, extra = compare_keys(state, expected)
    if missing or extra:
        what = f"missing {name_some(missing)}" if missing else f"unexpected {name_some(extra)}"
        raise ModelError(f"cannot load {source}: {what} for an ESM3")
    if bad := wrong_shape(state, expected):
        raise ModelError(f"cannot load {source}: {bad[0]} has shape {bad[1]}, expected {bad[2]}")
    module = ESM3(config)
    used = module.state_dict().keys()
    module.load_state_dict({k: state[k].float() for k in used}, strict=True)
    return module.float().eval()


def _weights_file(found: Path) -> Path | None:
    """The weights file itself, or the one .pth under the repository's data/weights/."""
    if found.is_file():
        return found
    candidates = sorted((found / "data" / "weights").glob("esm3*.pth"))
    return candidates[0] if candidates else None


def _config(state: dict[str, Tensor], source: Path) -> ESM3Config:
    """The shape from the weights (head width 64)."""
    try:
        vocab, d = state[SEQUENCE_KEY].shape
        ffn_hidden = state["transformer.blocks.0.ffn.3.weight"].shape[1]
        v_heads = state["transformer.blocks.0.geom_attn.proj.weight"].shape[0] // 15
    except (KeyError, ValueError) as exc:
        raise ModelError(f"cannot load {source}: not an ESM3 checkpoint (no {exc})") from None
    layers = len({int(m.group(1)) for key in state if (m := _BLOCK.match(key))})
    if d % HEAD_DIM or d % FUNCTION_TABLES or vocab != VOCAB_SIZE:
        raise ModelError(f"cannot load {source}: width {d} / vocabulary {vocab} is not an "
                         f"ESM3's (64-wide heads, vocabulary 64)")
    blocks = ESMCConfig(d_model=d, n_heads=d // HEAD_DIM, n_layers=layers,
                        ffn_hidden=ffn_hidden, vocab_size=vocab)
    return ESM3Config(blocks=blocks, v_heads=v_heads)


def expected_shapes(config: ESM3Config) -> dict[str, tuple[int, ...]]:
    """Every key of the original layout and its shape."""
    d, h, v = config.d_model, config.blocks.ffn_hidden, config.v_heads
    shapes: dict[str, tuple[int, ...]] = {
        SEQUENCE_KEY: (VOCAB_SIZE, d),
        "encoder.plddt_projection.weight": (d, RBF_BINS), "encoder.plddt_projection.bias": (d,),
        "encoder.structure_per_res_plddt_projection.weight": (d, RBF_BINS),
        "encoder.structure_per_res_plddt_projection.bias": (d,),
        "encoder.structure_tokens_embed.weight": (STRUCTURE_VOCAB, d),
        "encoder.ss8_embed.weight": (SS8_VOCAB, d), "encoder.sasa_embed.weight": (SASA_VOCAB, d),
        "encoder.residue_embed.weight": (RESIDUE_VOCAB, d),
        "transformer.norm.weight": (d,),
    }
    for k in range(FUNCTION_TABLES):
        shapes[f"encoder.function_embed.{k}.weight"] = (FUNCTION_VOCAB, d // FUNCTION_TABLES)
    for i in range(config.blocks.n_layers):
        at = f"transformer.blocks.{i}."
        shapes.update({
            f"{at}attn.layernorm_qkv.0.weight": (d,), f"{at}attn.layernorm_qkv.0.bias": (d,),
            f"{at}attn.layernorm_qkv.1.weight": (3 * d, d), f"{at}attn.out_proj.weight": (d, d),
            f"{at}attn.q_ln.weight": (d,), f"{at}attn.k_ln.weight": (d,),
            f"{at}ffn.0.weight": (d,), f"{at}ffn.0.bias": (d,),
            f"{at}ffn.1.weight": (2 * h, d), f"{at}ffn.3.weight": (d, h),
        })
    geom = "transformer.blocks.0.geom_attn."
    shapes.update({f"{geom}distance_scale_per_head": (v,),
                   f"{geom}rotation_scale_per_head": (v,), f"{geom}s_norm.weight": (d,),
                   f"{geom}proj.weight": (15 * v, d), f"{geom}out_proj.weight": (d, 3 * v)})
    for head, out in _HEADS.items():
        at = f"output_heads.{head}."
        shapes.update({f"{at}0.weight": (d, d), f"{at}0.bias": (d,), f"{at}2.weight": (d,),
                       f"{at}2.bias": (d,), f"{at}3.weight": (out, d), f"{at}3.bias": (out,)})
    return shapes
