"""One launch's inputs, built on the host and sent to the device in three copies.

Everything a batch needs on the device is known on the host before it runs: the pieces'
token ids, their lengths, where each piece's BOS and residues will lie in the rows of
the states, and the divisors of its pooled values. Built here as three host tensors
(token ids; int64 indices; float32 weights) and copied once each, from pinned memory with
non_blocking on CUDA, so the host never waits for the device to learn a shape or an
index (`HostBatch.upload`). Two layouts:

- packed (the fast engine): tokens are one (N,) int32 stream, BOS + residues + EOS per
  piece, no padding; the states' rows are the stream's (models/varlen.py);
- padded (the other encoders): tokens are (B, T) int64 padded with <pad>, as fair-esm's
  batch converter builds them; the states' rows are the (B * T) flattened positions.

Indices (int64): [the packing's positions | segments | cu_seqlens] when packed, then
BOS row (B,) | residue rows (R,) | residue piece (R,), R the batch's residue count.
Weights (float32): mean divisor (B,) | BOS divisor (B,) | residue count (B,) [| window
coverage (R,)]: a piece alone pools as esm-extract does (divide by 1, sum / n); a window
of a long protein contributes its share (module embed.py, `_Pool`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from esm2_batch.embedding.batching import SPECIAL_TOKENS
from esm2_batch.models.varlen import Packing, host_index, upload


@dataclass(frozen=True, slots=True)
class PieceInput:
    """One row of a launch: its residue token ids and how it is pooled."""

    residues: torch.Tensor  # (n,) uint8 token ids
    mean_divisor: float  # n alone; the whole protein's length for a window
    bos_divisor: float  # 1 alone; the protein's window count for a window
    coverage: Sequence[float] | None = None  # windows covering each residue (windows)


@dataclass(frozen=True, slots=True)
class HostBatch:
    """A launch's inputs on the host (module docstring)."""

    packed: bool
    counts: tuple[int, ...]  # residues per piece
    tokens: torch.Tensor  # (N,) int32 packed, (B, T) int64 padded
    index: torch.Tensor  # int64, see the module docstring
    weights: torch.Tensor  # float32, see the module docstring
    windowed: bool  # some piece is a window: coverage follows the divisors

    @property
    def size(self) -> int:
        """Pieces (sequences) in the launch."""
        return len(self.counts)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Tokens per piece, BOS and EOS included."""
        return tuple(n + SPECIAL_TOKENS for n in self.counts)

    @property
    def token_count(self) -> int:
        """Token positions the launch computes (padding included when padded)."""
        return self.tokens.numel()

    def residue_offsets(self) -> tuple[int, ...]:
        """(B + 1,) where each piece's residues start among the R residue rows."""
        return tuple(accumulate(self.counts, initial=0))

    def residue_pieces(self) -> torch.Tensor:
        """(R,) the piece of every residue row, on the host."""
        return self.index[len(self.index) - self._total :]

    @property
    def _total(self) -> int:
        return sum(self.counts)

    @property
    def _packing_size(self) -> int:
        return 2 * self.tokens.numel() + self.size + 1 if self.packed else 0

    def upload(self, device: torch.device) -> DeviceBatch:
        """The launch on `device`: three copies, none of them waited for."""
        tokens, index, weights = (upload(t, device) for t in (self.tokens, self.index,
                                                               self.weights))
        b, r, start = self.size, self._total, self._packing_size
        packing = (Packing.from_index(self.lengths, index[:start]) if self.packed else None)
        floats = weights[:, None]  # (3B [+ R], 1): broadcast over E
        return DeviceBatch(
            host=self, tokens=tokens, packing=packing, bos_rows=index[start : start + b],
            residue_rows=index[start + b : start + b + r],
            residue_pieces=index[start + b + r : start + b + 2 * r],
            mean_divisor=floats[:b], bos_divisor=floats[b : 2 * b],
            counts=floats[2 * b : 3 * b], coverage=floats[3 * b :] if self.windowed else None)


@dataclass(frozen=True, slots=True)
class DeviceBatch:
    """A launch's inputs on the device: views of the three uploaded tensors."""

    host: HostBatch
    tokens: torch.Tensor
    packing: Packing | None  # None: padded
    bos_rows: torch.Tensor  # (B,)
    residue_rows: torch.Tensor  # (R,)
    residue_pieces: torch.Tensor  # (R,)
    mean_divisor: torch.Tensor  # (B, 1)
    bos_divisor: torch.Tensor  # (B, 1)
    counts: torch.Tensor  # (B, 1) residues per piece
    coverage: torch.Tensor | None  # (R, 1), windows only


def build_batch(pieces: Sequence[PieceInput], *, packed: bool, bos: int, eos: int,
                pad: int) -> HostBatch:
    """The host tensors of a launch of `pieces` (module docstring); `bos`, `eos`, `pad`
    are the alphabet's token ids."""
    counts = tuple(int(p.residues.numel()) for p in pieces)
    size, total = len(pieces), sum(counts)
    if packed:
        ends = torch.tensor([bos, eos], dtype=torch.uint8)
        parts = [t for p in pieces for t in (ends[:1], p.residues, ends[1:])]
        tokens = torch.cat(parts).to(torch.int32)  # (N,)
        lengths = tuple(n + SPECIAL_TOKENS for n in counts)
        starts = list(accumulate(lengths, initial=0))[:-1]
        prefix = host_index(lengths)
    else:
        width = max(counts) + SPECIAL_TOKENS
        tokens = torch.full((size, width), pad, dtype=torch.int64)
        tokens[:, 0] = bos
        for row, (piece, n) in enumerate(zip(pieces, counts, strict=True)):
            tokens[row, 1 : n + 1] = piece.residues
            tokens[row, n + 1] = eos
        starts = [row * width for row in range(size)]
        prefix = torch.empty(0, dtype=torch.int64)
    repeats = torch.tensor(counts, dtype=torch.int64)
    bos_rows = torch.tensor(starts, dtype=torch.int64)  # (B,)
    residue_pieces = torch.repeat_interleave(torch.arange(size), repeats,
                                             output_size=total)  # (R,)
    first = torch.tensor(list(accumulate(counts, initial=0))[:-1], dtype=torch.int64)
    residue_rows = (torch.arange(total) + (bos_rows + 1 - first)
                    .repeat_interleave(repeats, output_size=total))  # (R,)
    index = torch.cat((prefix, bos_rows, residue_rows, residue_pieces))
    windowed = any(p.coverage is not None for p in pieces)
    floats = [p.mean_divisor for p in pieces] + [p.bos_divisor for p in pieces]
    floats += [float(n) for n in counts]
    if windowed:
        floats += [c for p, n in zip(pieces, counts, strict=True)
                   for c in (p.coverage if p.coverage is not None else [1.0] * n)]
    return HostBatch(packed=packed, counts=counts, tokens=tokens, index=index,
                     weights=torch.tensor(floats, dtype=torch.float32), windowed=windowed)
