"""Pooling a launch by segment (embedding/pooling.py) against each piece pooled alone,
on random states: every pooler, and a mean as close to the exact one as torch.mean's."""

from __future__ import annotations

import torch

from esm2_batch.embedding.batch import DeviceBatch, PieceInput, build_batch
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.embedding.pooling import pool_batch
from tests.tolerance import tolerance

COUNTS = (1022, 700, 300, 50, 5, 1)
WIDTH = 48


def launch(packed: bool) -> tuple[torch.Tensor, list[torch.Tensor], DeviceBatch]:
    """Random (2, rows, E) states for pieces of `COUNTS` residues in a launch's layout
    (packed or padded), each piece's (n + 2, E) rows of layer 0, and the launch."""
    pieces = [PieceInput(torch.full((n,), 5, dtype=torch.uint8), mean_divisor=float(n),
                         bos_divisor=1.0) for n in COUNTS]
    host = build_batch(pieces, packed=packed, bos=0, eos=2, pad=1)
    batch = host.upload(torch.device("cpu"))
    generator = torch.Generator().manual_seed(int(packed))
    states = torch.randn(2, host.token_count, WIDTH, generator=generator) * 3 + 1.5
    starts = batch.bos_rows.tolist()
    alone = [states[0, s : s + n + 2] for s, n in zip(starts, COUNTS, strict=True)]
    return states, alone, batch


def test_every_pooler_equals_each_piece_alone() -> None:
    for packed in (True, False):
        states, alone, batch = launch(packed)
        options = EmbedOptions(include=("mean", "bos", "max", "std"), repr_layers=(0, 1))
        pooled = pool_batch(states, batch, options)
        rows = pooled.payload[:, :-2].view(len(COUNTS), 8, WIDTH)
        assert pooled.payload[:, -2:].eq(0).all() and pooled.residues is None
        for b, piece in enumerate(alone):
            residues = piece[1:-1]
            want = (residues.mean(0), piece[0], residues.amax(0), residues.std(0, correction=0))
            limit = tolerance(torch.float32, terms=len(residues), magnitude=10.0)
            for k, value in enumerate(want):
                assert (rows[b, k] - value).abs().max().item() <= limit, (packed, b, k)


def test_segment_mean_is_as_close_as_torch_mean() -> None:
    states, alone, batch = launch(packed=True)
    got = pool_batch(states, batch, EmbedOptions()).payload[:, :WIDTH]
    for b, piece in enumerate(alone):
        exact = piece[1:-1].double().mean(0)
        ours = (got[b].double() - exact).abs().max().item()
        theirs = (piece[1:-1].mean(0).double() - exact).abs().max().item()
        assert ours <= max(theirs, 2 * torch.finfo(torch.float32).eps * 4.5), b
