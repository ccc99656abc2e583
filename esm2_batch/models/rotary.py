"""Rotary position embeddings: the one place their frequencies and angles are computed.

ESM2 (fair-esm's forward, the fast engine, the Hugging Face layout) and ESM C all use
rotary embeddings with base 1e4. Each model applies the rotation its own way (fair-esm's
half-split ``rotate_half``, the fast engine's interleaved complex pairs, ESM C's
GPT-NeoX form), but they all need the same numbers: frequencies ``base ** (-2i / D)``
and angles ``t * inv_freq`` computed in fp32 as single products, which is what makes
every table bit-identical to fair-esm's own in fp32. Building the tables in fp32 even for
an fp16/bf16 model matters: lowered frequencies round positions above 256.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

ROTARY_BASE = 10_000.0
"""The rotary base of every ESM2 and ESM C release (``rope_theta`` in HF configs)."""


def rotary_inv_freq(
    head_dim: int, base: float = ROTARY_BASE, *, device: torch.device | None = None
) -> torch.Tensor:
    """(D/2,) fp32 frequencies as fair-esm's RotaryEmbedding computes them.

    Published ESM2 checkpoints carry fp16-rounded values instead: use these only where a
    model stores none (ESM C, an HF file without ``inv_freq``)."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (base**exponent)


def rotary_angles(inv_freq: torch.Tensor, length: int) -> torch.Tensor:
    """(..., T, D/2) fp32 angles t * inv_freq for positions 0..T-1 and (..., D/2) fp32
    frequencies: one product each, exactly fair-esm's ``einsum("i,j->ij", t, inv_freq)``."""
    t = torch.arange(length, device=inv_freq.device, dtype=torch.float32)  # (T,)
    return t[:, None] * inv_freq[..., None, :]


def half_split_tables(
    inv_freq: torch.Tensor, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) cos and sin for ``x * cos + rotate_half(x) * sin`` (each frequency twice,
    halves side by side), computed in fp32 and cast to `dtype` only at the end."""
    angles = rotary_angles(inv_freq, length)  # (T, D/2)
    doubled = torch.cat((angles, angles), dim=-1)  # (T, D)
    return doubled.cos().to(dtype), doubled.sin().to(dtype)


def rope_theta(config: Mapping[str, Any]) -> float:
    """The rotary base of a Hugging Face ``config.json``: ``rope_parameters.rope_theta``
    (transformers 5), else ``rope_theta``, else `ROTARY_BASE`."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, Mapping) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(config.get("rope_theta", ROTARY_BASE))
