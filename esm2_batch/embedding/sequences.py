"""Input sequences as the embedder accepts them: named, uppercased, letters checked.

Kept apart from the pipeline (embed.py) because every caller that takes sequences from a
user (FASTA mode, the stages, the Python API) validates them the same way, before any
model work, and a bad letter is one InputError naming the sequence and the position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NoReturn

from esm2_batch.errors import InputError

__all__ = ["RESIDUES", "SequenceInput", "clean_sequence", "name_all"]

SequenceInput = str | tuple[str, str]
"""A bare sequence (named by its index) or a (name, sequence) pair."""

RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYXBUZO")
"""The letters ESM2 embeds: 20 amino acids, X (unknown), B, Z (ambiguous), U, O."""


def clean_sequence(sequence: str, *, name: str) -> str:
    """Uppercase, drop one trailing stop '*', and reject any letter ESM2 does not read."""
    if not isinstance(sequence, str):
        raise InputError(f"sequence {name!r} is a {type(sequence).__name__}, not a string")
    if not sequence.isascii():  # checked first: str.upper() maps some non-ASCII to ASCII
        _raise_bad_letter(sequence, name, allowed=lambda c: c.isascii())
    cleaned = sequence.upper().removesuffix("*")
    if not cleaned:
        raise InputError(f"sequence {name!r} is empty")
    if not RESIDUES.issuperset(cleaned):
        _raise_bad_letter(cleaned, name, allowed=RESIDUES.__contains__)
    return cleaned


def _raise_bad_letter(sequence: str, name: str, *, allowed: Callable[[str], bool]) -> NoReturn:
    """Raise the InputError for the first character `allowed` rejects."""
    position, char = next((i, c) for i, c in enumerate(sequence) if not allowed(c))
    raise InputError(
        f"sequence {name!r} has invalid character {char!r} at position {position + 1}: "
        f"ESM2 reads the 20 amino acids plus X, B, U, Z, O (a trailing '*' is dropped)"
    )


def name_all(sequences: Sequence[SequenceInput]) -> list[tuple[str, str]]:
    """(name, sequence) pairs; a bare string is named by its index."""
    if isinstance(sequences, str):
        raise InputError("sequences must be a list of sequences or (name, sequence) pairs, "
                         "not one string")
    pairs = []
    for index, item in enumerate(sequences):
        if isinstance(item, str):
            pairs.append((str(index), item))
        elif isinstance(item, tuple | list) and len(item) == 2:
            pairs.append((str(item[0]), item[1]))
        else:
            raise InputError(f"item {index} is neither a sequence nor a (name, sequence) pair")
    return pairs
