"""EmbedOptions: how sequences become rows, in one typed, documented object.

Every field is a CLI flag of the same name (``--toks_per_batch`` ...) and a keyword of
`embed_sequences` / `iter_embeddings`; the run's stages (a thread, Ray actors) receive
the object itself, so what a row depends on travels as one value and is checked once,
against the model, before any work (`EmbedOptions.check`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

from esm2_batch.embedding.batching import SPECIAL_TOKENS
from esm2_batch.errors import InputError

__all__ = ["AUTO_TOKENS", "POOLERS", "EmbedOptions", "LongSeqs", "Matrix", "Pooler", "Pooling",
           "matrix_name"]

AUTO_TOKENS = -1
"""``toks_per_batch`` "auto" (also accepted as that string): sized for the device once the
model is known (`embedding.budget.sized`: from free memory on CUDA, 4,096 elsewhere).
A number that is never a budget, so the field stays an int that every reader compares
as one (0 stays an error, as any other non-positive number)."""

Pooling = Literal["mean", "per_residue", "bos"]
"""What a row is: the mean over residues (no BOS/EOS/padding), every residue's state
[L, dim], or the BOS (<cls>) state."""
Pooler = Literal["mean", "bos", "max", "std"]
"""One pooled vector per protein (``include``, esm-extract's ``--include`` names where it
has them): the mean, the BOS state, the per-channel max or the per-channel standard
deviation (population: correction 0, so one residue gives zeros) over the residues only
(no BOS, EOS or padding). Window mode: max and std are taken over each residue's state
averaged over the windows covering it, so a residue counts once."""
POOLERS: tuple[str, ...] = get_args(Pooler)
Matrix = tuple[str, int]
"""(pooler, absolute layer): one pooled matrix of a run."""
LongSeqs = Literal["truncate", "window"]
"""Proteins longer than `truncation`: keep the first residues (esm-extract), or average
overlapping windows over the whole protein."""


@dataclass(frozen=True, slots=True)
class EmbedOptions:
    """How to embed; defaults are the CLI's.

    toks_per_batch: tokens per forward pass, BOS and EOS included (padding too where an
        engine pads; the fast engine packs, so there is none); `AUTO_TOKENS` (-1, or the
        string "auto"): sized for the device when the model is known (budget.py).
    batch_size: at most this many sequences per pass (None: only the token budget).
    truncation: residues kept per protein (window mode: the window length); None: the
        model's own context (1,022 for ESM2, 2,046 for FastESM2, ESM C and ESM3), filled
        in by `for_model` before anything is planned.
    long_seqs: "truncate" or "window" (see `LongSeqs`).
    repr_layer: the layer whose states are pooled; negative counts from the end
        (-1: the last, after the final LayerNorm; 0: the embeddings).
    pooling: "mean", "per_residue" or "bos" (see `Pooling`).
    repr_layers: several layers at once (esm-extract's ``--repr_layers``), from one
        forward per batch; empty means ``(repr_layer,)``. When given, `repr_layer` must be
        left at -1 or equal its first entry.
    include: several poolers at once (see `Pooler`); empty means ``(pooling,)``. When
        given, `pooling` must be left at "mean" or equal its first entry.
    per_tok: also hand back every residue's state, [L, dim] per layer of `repr_layers`
        (esm-extract's ``--include per_tok``), beside the pooled rows (`Embedded.residues`):
        the run's residue store (store/residues.py) writes them; they never change a row.

    A row is then one vector per (layer, pooler) pair, in the order of `matrices`: layer
    by layer, each layer's poolers in `include` order; the first is the one-layer,
    one-pooler row (what `Embedded.row` holds and esm_all.pt's ``emb`` stores).
    """

    toks_per_batch: int = AUTO_TOKENS
    batch_size: int | None = None
    truncation: int | None = None
    long_seqs: LongSeqs = "truncate"
    repr_layer: int = -1
    pooling: Pooling = "mean"
    repr_layers: tuple[int, ...] = ()
    include: tuple[Pooler, ...] = ()
    per_tok: bool = False

    def __post_init__(self) -> None:
        """Lists from Python callers become tuples, so the object stays hashable; the
        budget "auto" becomes `AUTO_TOKENS`."""
        if str(self.toks_per_batch) == "auto":  # typed int: the string comes from Python
            object.__setattr__(self, "toks_per_batch", AUTO_TOKENS)
        for name in ("repr_layers", "include"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @property
    def poolers(self) -> tuple[str, ...]:
        """The poolers of every row, first the one `Embedded.row` holds."""
        return tuple(self.include) or (self.pooling,)

    def for_model(self, max_residues: int) -> EmbedOptions:
        """These options with `truncation` filled in from the model's context when unset."""
        return self if self.truncation is not None else replace(self, truncation=max_residues)

    @property
    def cut(self) -> int:
        """The resolved truncation (see `for_model`)."""
        if self.truncation is None:
            raise ValueError("truncation is unresolved: call for_model(model context) first")
        return self.truncation

    def check(self, *, name: str, num_layers: int, max_residues: int) -> int:
        """Validate every field for a model with `num_layers` and a context of
        `max_residues`; return the absolute layer index. One-line InputError otherwise."""
        self.check_values()
        # positions beyond the training context
        if self.truncation is not None and self.truncation > max_residues:
            raise InputError(f"truncation {self.truncation} exceeds {name}'s context of "
                             f"{max_residues} residues; lower it, or use long_seqs='window' "
                             "to cover long proteins whole")
        self.layer_indices(name=name, num_layers=num_layers)
        return self.layer_index(name=name, num_layers=num_layers)

    def check_values(self) -> None:
        """What can be checked without the model: run before loading one."""
        if self.toks_per_batch != AUTO_TOKENS and not _positive_int(self.toks_per_batch):
            raise InputError(f"toks_per_batch must be a positive integer or 'auto', not "
                             f"{self.toks_per_batch!r}")
        if self.batch_size is not None and not _positive_int(self.batch_size):
            raise InputError(f"batch_size must be a positive integer or None, not "
                             f"{self.batch_size!r}")
        if self.truncation is not None and not _positive_int(self.truncation):
            raise InputError(f"truncation must be a positive integer, not {self.truncation!r}")
        if self.pooling not in get_args(Pooling):
            raise InputError(f"pooling must be one of {get_args(Pooling)}, not "
                             f"{self.pooling!r}")
        if self.long_seqs not in get_args(LongSeqs):
            raise InputError(f"long_seqs must be one of {get_args(LongSeqs)}, not "
                             f"{self.long_seqs!r}")
        if not isinstance(self.per_tok, bool):
            raise InputError(f"per_tok must be True or False, not {self.per_tok!r}")
        if self.per_tok and "per_residue" in self.poolers:
            raise InputError("per_tok and pooling 'per_residue' ask for the same states: "
                             "give one of them")
        if not _int(self.repr_layer):
            raise InputError(f"repr_layer must be an integer, not {self.repr_layer!r}")
        self._check_lists()

    def _check_lists(self) -> None:
        """repr_layers and include: right types, no repeats, no clash with the one-value
        fields (one question, one answer)."""
        layers, include = self.repr_layers, self.include
        if not isinstance(layers, tuple) or not all(_int(v) for v in layers):
            raise InputError(f"repr_layers must be a tuple of integers, not {layers!r}")
        if not isinstance(include, tuple) or not all(isinstance(p, str) for p in include):
            raise InputError(f"include must be a tuple of pooler names, not {include!r}")
        unknown = [p for p in include if p not in POOLERS]
        if unknown:
            raise InputError(f"unknown pooler {unknown[0]!r} in include: use "
                             f"{', '.join(POOLERS)}")
        if len(set(include)) < len(include):
            raise InputError(f"include names a pooler twice: {' '.join(include)}")
        if layers and self.repr_layer not in (-1, layers[0]):
            raise InputError(f"repr_layer {self.repr_layer} and repr_layers {list(layers)} "
                             "disagree: give one of them")
        if include and self.pooling not in ("mean", include[0]):
            raise InputError(f"pooling {self.pooling!r} and include {list(include)} "
                             "disagree: give one of them")

    def layer_index(self, *, name: str, num_layers: int) -> int:
        """The first layer (`repr_layers[0]`, else `repr_layer`) as an index in
        [0, num_layers]: the layer of `Embedded.row`."""
        return self.layer_indices(name=name, num_layers=num_layers)[0]

    def layer_indices(self, *, name: str, num_layers: int) -> tuple[int, ...]:
        """`repr_layers` (or `repr_layer`) as absolute indices; a layer beyond the model's
        depth or one named twice (20 and -14 of a 33-layer model) is an InputError."""
        given = self.repr_layers or (self.repr_layer,)
        found: list[int] = []
        for layer in given:
            if not _int(layer) or not -(num_layers + 1) <= layer <= num_layers:
                raise InputError(f"layer {layer!r} is beyond {name}'s depth: use -"
                                 f"{num_layers + 1}..{num_layers} (negative counts from the "
                                 "end, -1 is the last)")
            index = layer % (num_layers + 1)
            if index in found:
                raise InputError(f"repr_layers names layer {index} twice ({list(given)})")
            found.append(index)
        return tuple(found)

    def matrices(self, *, name: str, num_layers: int) -> tuple[Matrix, ...]:
        """Every (pooler, absolute layer) a row holds, in row order (see the class)."""
        layers = self.layer_indices(name=name, num_layers=num_layers)
        return tuple((pooler, layer) for layer in layers for pooler in self.poolers)

    def kept(self, length: int) -> int:
        """Residues of a `length`-residue protein that are embedded."""
        return length if self.long_seqs == "window" else min(length, self.cut)

    def tokens(self, length: int) -> int:
        """Tokens a protein costs, BOS and EOS included (padding excluded)."""
        return self.kept(length) + SPECIAL_TOKENS


def matrix_name(matrix: Matrix) -> str:
    """"max_layer20": how files and dicts name one (pooler, layer) matrix."""
    pooler, layer = matrix
    return f"{pooler}_layer{layer}"


def _int(value: object) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
