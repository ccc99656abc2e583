"""fair-esm's own ESM2: building it from a checkpoint, and its forward as the reference engine.

The module is built with fair-esm's ``load_model_and_alphabet_core``, so the architecture
and the state-dict mapping stay fair-esm's; the file itself is read by weights.py (fair-esm
would call ``torch.load`` without ``weights_only``). `ReferenceEncoder` runs fair-esm's
``ESM2.forward(tokens, repr_layers=[L])`` unchanged: the thing the fast engine
(esm2_fast.py) is measured and tested against.

Two defects of fair-esm's rotary embedding are fixed on every module built here
(`install_fp32_rotary`): fair-esm casts its ``inv_freq`` buffer with the model, so under
fp16 positions above 256 round; and a cos/sin cache built under ``torch.inference_mode``
breaks a later grad-enabled call of the same length. `Fp32RotaryEmbedding` rebuilds the
tables in fp32 whenever they would be wrong, from the checkpoint's own frequencies
(fp16-rounded in the published files, and what fair-esm's forward uses). The fast engine
reads the same fp32 frequencies (`rotary_frequencies`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import esm
import torch
from esm.model.esm2 import ESM2
from esm.rotary_embedding import RotaryEmbedding

from esm2_batch.errors import ModelError, first_line
from esm2_batch.models.rotary import half_split_tables

CONTEXT_TOKENS = 1024
"""ESM2's training context, BOS and EOS included."""
MAX_RESIDUES = CONTEXT_TOKENS - 2
"""Residues that fit ESM2's context next to BOS and EOS."""

_REGRESSION_WARNING = "Regression weights not found"


def build_module(name: str, data: dict[str, Any], path: Path) -> tuple[ESM2, esm.data.Alphabet]:
    """fair-esm's ESM2 and alphabet from checkpoint `data` in fair-esm's layout, built by
    fair-esm's own loader; `path` only names the source in errors.

    The contact-regression head is deliberately absent (embeddings never use it), so
    ``predict_contacts`` is not meaningful on a module built here.
    """
    # fair-esm picks its ESM2 code path by the name's prefix; the layout is checked already.
    core_name = name if name.startswith("esm2") else f"esm2_{name}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_REGRESSION_WARNING)
            module, alphabet = esm.pretrained.load_model_and_alphabet_core(
                core_name, data, regression_data=None)
    except (RuntimeError, KeyError, AttributeError, TypeError) as exc:
        raise ModelError(f"cannot load {path}: {first_line(exc)}") from None
    return module, alphabet


def prepare(module: ESM2, device: torch.device, dtype: torch.dtype) -> ESM2:
    """`module` ready for inference: fp32 rotary tables installed (before the cast, which
    would lower the frequencies), eval mode, on `device` in `dtype`."""
    install_fp32_rotary(module)
    return module.eval().to(device=device, dtype=dtype)


@dataclass(frozen=True, slots=True)
class ReferenceEncoder:
    """The reference engine: fair-esm's own ``ESM2.forward``, states zeroed at padding.

    fair-esm computes states at padded positions too; they mean nothing, and zeroing them
    makes both ESM2 engines return the same thing there."""

    module: ESM2
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def embed_dim(self) -> int:
        return int(self.module.embed_dim)

    @property
    def num_layers(self) -> int:
        return int(self.module.num_layers)

    @property
    def max_residues(self) -> int:
        return MAX_RESIDUES

    def __call__(self, tokens: torch.Tensor, *, layer: int) -> torch.Tensor:
        """(B, T) tokens -> (B, T, E) states after `layer` (0 = embeddings)."""
        out = self.module(tokens, repr_layers=[layer])
        states: torch.Tensor = out["representations"][layer]
        return states.masked_fill(tokens.eq(self.module.padding_idx).unsqueeze(-1), 0.0)

    def states(self, tokens: torch.Tensor, *, layers: tuple[int, ...]) -> torch.Tensor:
        """(n, B, T, E) states after each of `layers`, from one ``ESM2.forward``."""
        out = self.module(tokens, repr_layers=list(layers))["representations"]
        states = torch.stack([out[layer] for layer in layers])
        return states.masked_fill(tokens.eq(self.module.padding_idx)[None, :, :, None], 0.0)


class Fp32RotaryEmbedding(RotaryEmbedding):  # type: ignore[misc]  # fair-esm is untyped
    """fair-esm's rotary embedding with tables built in fp32 and rebuilt when stale.

    fair-esm derives the tables from its ``inv_freq`` buffer, which ``.half()`` lowers too;
    here the frequencies are kept aside in fp32 and the result is cast to the activations'
    dtype. The frequencies are the checkpoint's (`inv_freq`), not recomputed: ESM2 was
    trained in fp16, the published files carry fp16-rounded values, and fair-esm's forward
    uses them. In fp32 the tables are bit-identical to fair-esm's. The cache is also
    rebuilt when it holds inference tensors outside inference mode, which autograd cannot
    save.
    """

    def __init__(self, dim: int, inv_freq: torch.Tensor | None = None) -> None:
        super().__init__(dim)
        if inv_freq is not None:
            self.inv_freq.copy_(inv_freq)
        self._inv_freq32: torch.Tensor = self.inv_freq.detach().float().clone()

    def _update_cos_sin_tables(
        self, x: torch.Tensor, seq_dimension: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = x.shape[seq_dimension]
        if self._stale(seq_len, x):
            inv_freq = self._inv_freq32.to(x.device)
            cos, sin = half_split_tables(inv_freq, seq_len, x.dtype)  # (T, D) each
            self._cos_cached, self._sin_cached = cos[None], sin[None]  # (1, T, D)
            self._seq_len_cached = seq_len
        return self._cos_cached, self._sin_cached

    def _stale(self, seq_len: int, x: torch.Tensor) -> bool:
        cos: torch.Tensor | None = self._cos_cached
        return (
            cos is None
            or seq_len != self._seq_len_cached
            or cos.device != x.device
            or cos.dtype != x.dtype
            or (cos.is_inference() and not torch.is_inference_mode_enabled())
        )


def install_fp32_rotary(module: ESM2) -> None:
    """Swap every layer's rotary embedding for `Fp32RotaryEmbedding`, keeping the loaded
    frequencies (same state dict, same values); call it before casting the module."""
    for layer in module.layers:
        attention = layer.self_attn
        loaded = attention.rot_emb.inv_freq
        attention.rot_emb = Fp32RotaryEmbedding(attention.head_dim, loaded).to(loaded.device)


def rotary_frequencies(module: ESM2) -> torch.Tensor:
    """(L, D/2) fp32 rotary frequencies of every layer, as loaded: the fp32 copy an
    installed `Fp32RotaryEmbedding` keeps, else fair-esm's buffer (which a cast of the
    module has lowered too)."""
    return torch.stack([_frequencies(layer.self_attn.rot_emb) for layer in module.layers])


def _frequencies(rotary: RotaryEmbedding) -> torch.Tensor:
    if isinstance(rotary, Fp32RotaryEmbedding):
        return rotary._inv_freq32
    return rotary.inv_freq.float()  # type: ignore[no-any-return]  # fair-esm is untyped
