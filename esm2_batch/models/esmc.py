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

Weights load from either layout, strictly (every parameter present, nothing unknown, every
shape right, each failure one `ModelError` line), with the config inferred from shapes:

- the original state dict (``data/weights/esmc_300m_2024_12_v0.pth``): ``embed.weight``,
  ``transformer.blocks.N.attn.layernorm_qkv.{0.weight,0.bias,1.weight}``,
  ``transformer.blocks.N.attn.{q_ln,k_ln,out_proj}.weight``,
  ``transformer.blocks.N.ffn.{0.weight,0.bias,1.weight,3.weight}``,
  ``transformer.norm.weight``, ``sequence_head.*`` (the LM head, not loaded);
- the Hugging Face layout (``biohub/ESMC-300M``, transformers' ``EsmcModel``):
  ``esmc.embed_tokens``, ``esmc.layers.N.{input_layernorm, post_attention_layernorm}``,
  ``esmc.layers.N.self_attn.{q,k,v,o}_proj, q_norm, k_norm``,
  ``esmc.layers.N.mlp.{gate,up,down}_proj``, ``esmc.norm``, ``lm_head.*`` (not loaded);
  q/k/v are fused into ``layernorm_qkv.1`` and gate/up into ``ffn.1`` (gate first: silu
  applies to it). The ``esmc.`` prefix is optional (``EsmcModel`` saved directly).

The module's parameter names are the original layout's, so that file loads as it is.
Heads are d / 64 (every ESM C has 64-wide heads) unless a ``config.json`` says otherwise.

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

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esm2_batch.errors import InputError, ModelError
from esm2_batch.models.hf_esm2 import (
    CONFIG_FILE,
    find_in_hf_cache,
    looks_like_hub_id,
    read_hf_config,
    read_hf_weights,
    read_weights_file,
)

Tensor = torch.Tensor

HEAD_DIM = 64
VOCAB_SIZE = 64
ROTARY_BASE = 10000.0
LAYER_NORM_EPS = 1e-5
CONTEXT_TOKENS = 2048
"""Training context, BOS and EOS included (2046 residues)."""
BOS_IDX, PAD_IDX, EOS_IDX, MASK_IDX = 0, 1, 2, 32
"""Same ids as fair-esm's ESM2 alphabet, so ESM2's tokenization serves ESM C unchanged."""

_ORIGINAL_BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.")
_HF_BLOCK = re.compile(r"^layers\.(\d+)\.")
_ORIGINAL_HEAD = re.compile(r"^sequence_head\.")
_HF_HEAD = re.compile(r"^lm_head\.")


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
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, T, d)


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
        x = x + self.attn(x, rotary, mask) / self.scale
        return x + self.ffn(x) / self.scale


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
        depth = resolve_layer(layer, self.num_layers)
        x = self.embed(tokens)  # (B, T, d)
        rotary = rotary_tables(tokens.shape[1], self.config, device=x.device, dtype=x.dtype)
        mask = padding_mask(tokens)
        for block in self.transformer.blocks[:depth]:
            x = block(x, rotary, mask)
        if depth == self.num_layers:
            x = self.transformer.norm(x)
        return x


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
    dim = config.head_dim
    inv_freq = 1.0 / (config.rotary_base ** (
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))  # (D/2,)
    positions = torch.arange(length, device=device, dtype=torch.float32)  # (T,)
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]  # (1, T, 1, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


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


def read_esmc_state(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Tensor], int | None, float, Path]:
    """(original-layout state without the LM head, heads from config.json or None, rotary
    base, the file or folder read) for any source `load_esmc` accepts."""
    source = _resolve_source(path)
    if source.is_dir():
        return _read_folder(source)
    return _to_original(read_weights_file(source), source), None, ROTARY_BASE, source


def is_esmc_source(path: str | os.PathLike[str]) -> bool:
    """Whether `path` (file or folder) holds ESM C weights; never raises. Reads only a
    config.json or the weight names, for choosing a backend from ``--model_path``."""
    source = Path(path).expanduser()
    try:
        if source.is_dir():
            if _original_weights(source) is not None:
                return True
            return read_hf_config(source).get("model_type") == "esmc"
        if source.is_file():
            return _layout(_weight_names(source)) is not None
    except Exception:  # a probe: any unreadable file is simply not ESM C
        return False
    return False


def check_state(module: ESMC, state: Mapping[str, Tensor], where: Path) -> None:
    """Strict key and shape check against `module`, as one-line `ModelError`s."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    missing = [name for name in expected if name not in state]
    unknown = [name for name in state if name not in expected]
    if missing or unknown:
        what = f"missing {_some(missing)}" if missing else f"unexpected {_some(unknown)}"
        raise ModelError(f"cannot load {where}: not an ESM C checkpoint ({what})")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ModelError(f"cannot load {where}: {name} has shape {tuple(state[name].shape)}, "
                             f"the inferred {module.num_layers}-layer ESM C needs {shape}")


def _resolve_source(path: str | os.PathLike[str]) -> Path:
    """An existing file or folder, else a hub id resolved in the local HF cache."""
    source = Path(path).expanduser()
    if source.exists():
        return source
    if looks_like_hub_id(path):
        return find_in_hf_cache(str(path))
    raise ModelError(f"ESM C weights not found: {source} (pass a .pth file, a Hugging Face "
                     f"folder, or a hub id like biohub/ESMC-300M that is in the HF cache)")


def _read_folder(folder: Path) -> tuple[dict[str, Tensor], int | None, float, Path]:
    """A Hugging Face folder (config.json + weights), else the original hub folder."""
    original = _original_weights(folder)
    if original is not None and not (folder / CONFIG_FILE).is_file():
        return _to_original(read_weights_file(original), original), None, ROTARY_BASE, original
    config = read_hf_config(folder)
    if config.get("model_type", "esmc") != "esmc":
        raise ModelError(f"cannot load {folder}: config.json has model_type "
                         f"{config.get('model_type')!r}, not 'esmc'")
    _check_hf_config(config, folder)
    if original is not None and not _has_hf_weights(folder):
        state = read_weights_file(original)
    else:
        state = read_hf_weights(folder)
    heads = config.get("num_attention_heads")
    return (_to_original(state, folder), int(heads) if heads else None,
            _rope_theta(config), folder)


def _original_weights(folder: Path) -> Path | None:
    """The ``data/weights/*.pth`` of the original hub repository, if there is exactly one."""
    found = sorted((folder / "data" / "weights").glob("*.pth"))
    return found[0] if len(found) == 1 else None


def _has_hf_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in
               ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json"))


def _check_hf_config(config: Mapping[str, Any], folder: Path) -> None:
    """Refuse config.json settings this implementation does not have (one line each)."""
    head_dim = config.get("head_dim")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    checks = (
        (config.get("hidden_act", "silu") == "silu", "hidden_act is not silu"),
        (not config.get("attention_bias") and not config.get("mlp_bias"), "biases are set"),
        (config.get("num_key_value_heads") in (None, heads), "grouped-query attention"),
        (head_dim is None or not heads or not hidden or head_dim * heads == hidden,
         "head_dim x heads != hidden_size"),
    )
    for ok, why in checks:
        if not ok:
            raise ModelError(f"cannot load {folder}: unsupported ESM C config ({why})")


def _rope_theta(config: Mapping[str, Any]) -> float:
    """``rope_parameters.rope_theta`` (transformers 5) or ``rope_theta``, default 1e4."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, Mapping) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(config.get("rope_theta", ROTARY_BASE))


def _weight_names(path: Path) -> list[str]:
    """Tensor names of a weights file (a safetensors header, or an mmap'd torch file)."""
    if path.suffix == ".safetensors":
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            header = file.read(min(length, 100 * 1024 * 1024))
        return [name for name in json.loads(header) if name != "__metadata__"]
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return list(state) if isinstance(state, Mapping) else []


def _layout(names: Iterable[str]) -> str | None:
    """ "original", "hf" or None (not ESM C) from tensor names."""
    names = set(names)
    if "embed.weight" in names and "transformer.norm.weight" in names:
        return "original"
    if {"esmc.embed_tokens.weight", "esmc.norm.weight"} <= names:
        return "hf"
    if {"embed_tokens.weight", "norm.weight", "layers.0.self_attn.q_norm.weight"} <= names:
        return "hf"
    return None


def _to_original(state: Mapping[str, Tensor], where: Path) -> dict[str, Tensor]:
    """The original-layout weights of `state` (either layout), LM head dropped."""
    layout = _layout(state)
    if layout is None:
        raise ModelError(f"cannot load {where}: not an ESM C checkpoint (neither the original "
                         f"embed./transformer. names nor the Hugging Face esmc. names)")
    if layout == "original":
        return {key: value for key, value in state.items() if not _ORIGINAL_HEAD.match(key)}
    return _hf_to_original(state, where)


def _hf_to_original(state: Mapping[str, Tensor], where: Path) -> dict[str, Tensor]:
    """Rename (and fuse) Hugging Face ESM C weights; unknown keys are kept so that
    `check_state` reports them, missing ones are reported here."""
    prefix = "esmc." if "esmc.embed_tokens.weight" in state else ""
    body = {key[len(prefix):]: value for key, value in state.items()
            if key.startswith(prefix) and not _HF_HEAD.match(key)}
    others = [key for key in state if not key.startswith(prefix) and not _HF_HEAD.match(key)]
    if others:
        raise ModelError(f"cannot load {where}: not an ESM C checkpoint "
                         f"(unexpected {_some(others)})")
    out = {"embed.weight": _pop(body, "embed_tokens.weight", where),
           "transformer.norm.weight": _pop(body, "norm.weight", where)}
    layers = sorted({int(m.group(1)) for key in body if (m := _HF_BLOCK.match(key))})
    for layer in layers:
        out.update(_hf_block(body, layer, where))
    out.update(body)  # leftovers: unknown names, reported by check_state
    return out


def _hf_block(body: dict[str, Tensor], layer: int, where: Path) -> dict[str, Tensor]:
    """One block's original-layout weights from its HF weights (removed from `body`)."""
    def take(name: str) -> Tensor:
        return _pop(body, f"layers.{layer}.{name}", where)

    to = f"transformer.blocks.{layer}."
    qkv = torch.cat([take(f"self_attn.{p}_proj.weight") for p in "qkv"])  # (3d, d)
    gate_up = torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")])  # (2h, d)
    return {
        f"{to}attn.layernorm_qkv.0.weight": take("input_layernorm.weight"),
        f"{to}attn.layernorm_qkv.0.bias": take("input_layernorm.bias"),
        f"{to}attn.layernorm_qkv.1.weight": qkv,
        f"{to}attn.q_ln.weight": take("self_attn.q_norm.weight"),
        f"{to}attn.k_ln.weight": take("self_attn.k_norm.weight"),
        f"{to}attn.out_proj.weight": take("self_attn.o_proj.weight"),
        f"{to}ffn.0.weight": take("post_attention_layernorm.weight"),
        f"{to}ffn.0.bias": take("post_attention_layernorm.bias"),
        f"{to}ffn.1.weight": gate_up,
        f"{to}ffn.3.weight": take("mlp.down_proj.weight"),
    }


def _pop(body: dict[str, Tensor], name: str, where: Path) -> Tensor:
    """Remove and return `name`, or fail naming it."""
    if name not in body:
        raise ModelError(f"cannot load {where}: not an ESM C checkpoint (missing {name})")
    return body.pop(name)


def _some(names: Iterable[str], limit: int = 3) -> str:
    """A few names and how many more, so a message stays one line."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
