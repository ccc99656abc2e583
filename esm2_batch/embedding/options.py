"""EmbedOptions: how sequences become rows, in one typed, documented object.

Every field is a CLI flag of the same name (``--toks_per_batch`` ...) and a keyword of
`embed_sequences` / `iter_embeddings`; the run's stages (a thread, Ray actors) receive
the object itself, so what a row depends on travels as one value and is checked once,
against the model, before any work (`EmbedOptions.check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from esm2_batch.embedding.batching import MAX_RESIDUES, SPECIAL_TOKENS
from esm2_batch.errors import InputError

__all__ = ["EmbedOptions", "LongSeqs", "Pooling"]

Pooling = Literal["mean", "per_residue", "bos"]
"""What a row is: the mean over residues (no BOS/EOS/padding), every residue's state
[L, dim], or the BOS (<cls>) state."""
LongSeqs = Literal["truncate", "window"]
"""Proteins longer than `truncation`: keep the first residues (esm-extract), or average
overlapping windows over the whole protein."""


@dataclass(frozen=True, slots=True)
class EmbedOptions:
    """How to embed; defaults are the CLI's.

    toks_per_batch: tokens per forward pass, counting padding, BOS and EOS.
    batch_size: at most this many sequences per pass (None: only the token budget).
    truncation: residues kept per protein (window mode: the window length).
    long_seqs: "truncate" or "window" (see `LongSeqs`).
    repr_layer: the layer whose states are pooled; negative counts from the end
        (-1: the last, after the final LayerNorm; 0: the embeddings).
    pooling: "mean", "per_residue" or "bos" (see `Pooling`).
    """

    toks_per_batch: int = 4096
    batch_size: int | None = None
    truncation: int = MAX_RESIDUES
    long_seqs: LongSeqs = "truncate"
    repr_layer: int = -1
    pooling: Pooling = "mean"

    def check(self, *, name: str, num_layers: int, max_residues: int) -> int:
        """Validate every field for a model with `num_layers` and a context of
        `max_residues`; return the absolute layer index. One-line InputError otherwise."""
        self.check_values()
        if self.truncation > max_residues:  # positions beyond the training context
            raise InputError(f"truncation {self.truncation} exceeds {name}'s context of "
                             f"{max_residues} residues; lower it, or use long_seqs='window' "
                             "to cover long proteins whole")
        return self.layer_index(name=name, num_layers=num_layers)

    def check_values(self) -> None:
        """What can be checked without the model: run before loading one."""
        if not _positive_int(self.toks_per_batch):
            raise InputError(f"toks_per_batch must be a positive integer, not "
                             f"{self.toks_per_batch!r}")
        if self.batch_size is not None and not _positive_int(self.batch_size):
            raise InputError(f"batch_size must be a positive integer or None, not "
                             f"{self.batch_size!r}")
        if not _positive_int(self.truncation):
            raise InputError(f"truncation must be a positive integer, not {self.truncation!r}")
        if self.pooling not in get_args(Pooling):
            raise InputError(f"pooling must be one of {get_args(Pooling)}, not "
                             f"{self.pooling!r}")
        if self.long_seqs not in get_args(LongSeqs):
            raise InputError(f"long_seqs must be one of {get_args(LongSeqs)}, not "
                             f"{self.long_seqs!r}")
        if not _int(self.repr_layer):
            raise InputError(f"repr_layer must be an integer, not {self.repr_layer!r}")

    def layer_index(self, *, name: str, num_layers: int) -> int:
        """`repr_layer` as an absolute index in [0, num_layers]."""
        layer = self.repr_layer
        if not _int(layer) or not -(num_layers + 1) <= layer <= num_layers:
            raise InputError(f"repr_layer must be in [{-(num_layers + 1)}, {num_layers}] for "
                             f"{name}, not {layer!r}")
        return layer % (num_layers + 1)

    def kept(self, length: int) -> int:
        """Residues of a `length`-residue protein that are embedded."""
        return length if self.long_seqs == "window" else min(length, self.truncation)

    def tokens(self, length: int) -> int:
        """Tokens a protein costs, BOS and EOS included (padding excluded)."""
        return self.kept(length) + SPECIAL_TOKENS


def _int(value: object) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
