"""Random-weight ESM2 models saved in fair-esm's official checkpoint layout.

No weights can be downloaded on the machines this project is tested on, so tests and
benchmarks build ESM2 with random weights (fixed seed) and write them exactly as the
published ``esm2_*.pt`` files are laid out, so the real loading code runs on them::

    {"model": {"encoder.sentence_encoder.<param>": ..., "encoder.lm_head.<param>": ...},
     "cfg": {"model": argparse.Namespace(encoder_layers, encoder_embed_dim,
                                          encoder_attention_heads, token_dropout)}}

fair-esm's ``_load_model_and_alphabet_core_v2`` strips the two prefixes; the contact
regression weights live in a separate "-contact-regression.pt" file, never written here.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path

import esm
import torch
from esm.model.esm2 import ESM2

from esm2_batch.models import ESM2_MODELS
from esm2_batch.models.weights import read_checkpoint

_REGRESSION_PREFIX = "contact_head.regression."


def build_random_esm2(
    *, num_layers: int = 2, embed_dim: int = 64, heads: int = 4, seed: int = 0,
    token_dropout: bool = True,
) -> ESM2:
    """An ESM2 with PyTorch's default random init under `seed`; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=heads,
                    alphabet="ESM-1b", token_dropout=token_dropout)


def official_layout(module: ESM2) -> dict[str, object]:
    """The checkpoint dict fair-esm publishes for `module` (without contact regression)."""
    state = {
        _official_key(key): value.clone()
        for key, value in module.state_dict().items()
        if not key.startswith(_REGRESSION_PREFIX)
    }
    cfg = argparse.Namespace(
        encoder_layers=module.num_layers, encoder_embed_dim=module.embed_dim,
        encoder_attention_heads=module.attention_heads, token_dropout=module.token_dropout,
    )
    return {"model": state, "cfg": {"model": cfg}}


def _official_key(key: str) -> str:
    """fairseq's name for a parameter: the LM head sits under encoder., the rest deeper."""
    if key.startswith("lm_head."):
        return f"encoder.{key}"
    return f"encoder.sentence_encoder.{key}"


def write_tiny_checkpoint(
    path: str | Path, *, num_layers: int = 2, embed_dim: int = 64, heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a tiny random ESM2; a directory `path` gets ``esm2_t{layers}_tiny_test.pt``."""
    module = build_random_esm2(num_layers=num_layers, embed_dim=embed_dim, heads=heads,
                               seed=seed)
    return _save(module, Path(path), default_name=f"esm2_t{num_layers}_tiny_test.pt")


def write_random_checkpoint(path: str | Path, *, size: str = "35M", seed: int = 0) -> Path:
    """Save the architecture of a published size ("8M", "35M", ...) with random weights.

    A directory `path` gets the official file name (e.g. esm2_t12_35M_UR50D.pt), so the
    file also serves as a fake torch-hub cache entry.
    """
    spec = ESM2_MODELS[size]
    module = build_random_esm2(num_layers=spec.num_layers, embed_dim=spec.embed_dim,
                               heads=spec.attention_heads, seed=seed)
    return _save(module, Path(path), default_name=f"{spec.name}.pt")


def _save(module: ESM2, path: Path, *, default_name: str) -> Path:
    """Write `module` in the official layout; file names must start with "esm2"."""
    target = path / default_name if path.is_dir() else path
    if not target.name.startswith("esm2"):
        raise ValueError(f"fair-esm only reads ESM2 files named esm2*: {target.name}")
    torch.save(official_layout(module), target)
    return target


def fair_esm_states(checkpoint: Path) -> Callable[[str, int], torch.Tensor]:
    """fair-esm's own module on `checkpoint` (its rotary, its attention), as the reference
    the project's rows are tested against: (sequence, layer) -> (T, E)
    ``representations[layer][0]``, BOS and EOS included."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Regression weights not found")
        module, alphabet = esm.pretrained.load_model_and_alphabet_core(
            checkpoint.stem, read_checkpoint(checkpoint))
    module.eval()
    convert = alphabet.get_batch_converter()

    def states(sequence: str, layer: int) -> torch.Tensor:
        _, _, tokens = convert([("x", sequence)])
        with torch.no_grad():
            found: torch.Tensor = module(tokens, repr_layers=[layer])["representations"][layer][0]
        return found

    return states
