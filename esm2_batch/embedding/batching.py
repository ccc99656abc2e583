"""Pure planning for the embedder: which residues go into which forward pass.

Nothing here touches torch or a model, so every rule is unit-tested in microseconds:

- `plan_batches` packs sequences under a token budget. ESM2 adds a BOS and an EOS token
  to every sequence, and a padded batch costs ``max_len * n_seqs`` tokens on the device,
  so the budget counts exactly that (fair-esm's ``get_batch_indices`` counts one extra
  token per sequence, not two, and budgets the untruncated length); a packed batch (the
  fast engine's unpadded stream) costs the sum of its sequences' tokens, so with
  ``packed=True`` the budget counts that.
- `split_batch` cuts a planned batch into launches under a smaller budget (the size
  that fit after a CUDA out-of-memory), keeping its order; nothing is ever dropped.
- `plan_windows` cuts a long protein into overlapping windows so a 35,000-residue titin
  runs with the memory of a 1,022-residue one; `window_coverage` says how many windows
  cover each residue, which is what overlapping states are averaged by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SPECIAL_TOKENS = 2
"""Tokens ESM2 adds to every sequence: BOS (<cls>) in front, EOS behind."""

MAX_RESIDUES = 1022
"""Residues that fit ESM2's 1,024-token training context next to BOS and EOS."""


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Batches of indices into the planned lengths, plus those that fit no batch.

    `batches` run longest first, so a budget too large for the device fails in the first
    minute rather than the last. `oversize` lists, in input order, the sequences that alone
    need more than the budget: they are reported, never run over budget silently.
    """

    batches: tuple[tuple[int, ...], ...]
    oversize: tuple[int, ...]


def padded_tokens(lengths: Sequence[int], *, extra_tokens: int = SPECIAL_TOKENS) -> int:
    """Tokens a batch of these residue counts occupies once padded to its longest member."""
    if not lengths:
        return 0
    return (max(lengths) + extra_tokens) * len(lengths)


def packed_tokens(lengths: Sequence[int], *, extra_tokens: int = SPECIAL_TOKENS) -> int:
    """Tokens a batch of these residue counts occupies packed (no padding)."""
    return sum(lengths) + extra_tokens * len(lengths)


def batch_tokens(lengths: Sequence[int], *, packed: bool,
                 extra_tokens: int = SPECIAL_TOKENS) -> int:
    """What a batch costs against the budget: packed or padded tokens."""
    count = packed_tokens if packed else padded_tokens
    return count(lengths, extra_tokens=extra_tokens)


def plan_batches(
    lengths: Sequence[int],
    *,
    toks_per_batch: int,
    batch_size: int | None = None,
    extra_tokens: int = SPECIAL_TOKENS,
    packed: bool = False,
) -> BatchPlan:
    """Pack residue counts into batches of at most `toks_per_batch` tokens: padded
    tokens, or with `packed` the sum of the members' tokens (`batch_tokens`).

    Sorting by length (longest first, ties by index for determinism) keeps sequences of
    similar length together, so padding stays small. A batch closes when adding the next
    sequence would exceed the budget or `batch_size` sequences. Every index appears exactly
    once, either in a batch or in `oversize`.
    """
    if toks_per_batch < 1:
        raise ValueError(f"toks_per_batch must be positive, not {toks_per_batch}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive or None, not {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    oversize = sorted(i for i in order if lengths[i] + extra_tokens > toks_per_batch)
    skip = set(oversize)
    kept = [i for i in order if i not in skip]
    batches = _consecutive(kept, lengths, toks_per_batch=toks_per_batch,
                           batch_size=batch_size, extra_tokens=extra_tokens, packed=packed)
    return BatchPlan(batches=batches, oversize=tuple(oversize))


def split_batch(
    lengths: Sequence[int], *, toks_per_batch: int, packed: bool,
    extra_tokens: int = SPECIAL_TOKENS,
) -> tuple[tuple[int, ...], ...]:
    """A planned batch (its members' residue counts, longest first) cut into consecutive
    groups of positions within `toks_per_batch`; a member that alone exceeds it is a
    group of its own (it was planned under a larger budget: it is tried, never dropped)."""
    return _consecutive(range(len(lengths)), lengths, toks_per_batch=toks_per_batch,
                        batch_size=None, extra_tokens=extra_tokens, packed=packed)


def _consecutive(
    order: Sequence[int], lengths: Sequence[int], *, toks_per_batch: int,
    batch_size: int | None, extra_tokens: int, packed: bool,
) -> tuple[tuple[int, ...], ...]:
    """`order` (longest first) cut greedily where the next member would break the budget
    or `batch_size`; the first member of a group always joins it."""
    batches: list[tuple[int, ...]] = []
    current: list[int] = []
    cost = 0  # of `current`; padded: the first (longest) member sets the width
    for i in order:
        tokens = lengths[i] + extra_tokens
        grown = cost + tokens if packed else (lengths[current[0]] + extra_tokens if current
                                              else tokens) * (len(current) + 1)
        full = batch_size is not None and len(current) >= batch_size
        if current and (full or grown > toks_per_batch):
            batches.append(tuple(current))
            current, grown = [], tokens
        current.append(i)
        cost = grown
    if current:
        batches.append(tuple(current))
    return tuple(batches)


def window_overlap(window: int) -> int:
    """Residues shared by neighbouring windows: a quarter of a window (255 for 1,022).

    A quarter keeps the cost of titin near 1.3x the single-pass cost while every residue
    cut off from its context at a window edge also appears at least window/8 residues
    from an edge in the neighbouring window, whose states it is averaged with.
    """
    return window // 4


def plan_windows(length: int, *, window: int = MAX_RESIDUES) -> tuple[tuple[int, int], ...]:
    """Half-open residue ranges [start, end) of at most `window` residues covering `length`.

    A sequence that fits is one range (0, length), so window mode equals truncate mode for
    it. Longer ones step by ``window - window_overlap(window)``; the last window is aligned
    to the end, so every window is full length and the tail is never a sliver.
    """
    if length < 0 or window < 1:
        raise ValueError(f"need length >= 0 and window >= 1, not {length}, {window}")
    if length <= window:
        return ((0, length),)
    stride = max(1, window - window_overlap(window))
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return tuple((s, s + window) for s in starts)


def window_coverage(length: int, windows: Sequence[tuple[int, int]]) -> list[int]:
    """How many of `windows` cover each residue: the divisor when averaging their states."""
    counts = [0] * length
    for start, end in windows:
        for p in range(start, end):
            counts[p] += 1
    if any(c == 0 for c in counts):
        raise ValueError("windows leave residues uncovered")
    return counts
