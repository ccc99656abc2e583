"""Reading a launch the embedder sends to the model (`embed.forward_states`' batch), the
same way for the fast engine's packed stream and the other encoders' padded batches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from esm2_batch.embedding import embed
from esm2_batch.embedding.batch import DeviceBatch
from esm2_batch.models import LoadedModel


def piece_residues(batch: DeviceBatch) -> list[torch.Tensor]:
    """Each piece's residue token ids (no BOS, EOS or padding), in launch order."""
    flat = batch.tokens.flatten()
    offsets = batch.host.residue_offsets()
    return [flat[batch.residue_rows[offsets[b] : offsets[b + 1]]].long()
            for b in range(batch.host.size)]


def first_residue_rows(batch: DeviceBatch) -> torch.Tensor:
    """(B,) the states' row of each piece's first residue."""
    return batch.residue_rows[list(batch.host.residue_offsets()[:-1])]


def on_launch(monkeypatch: pytest.MonkeyPatch,
              see: Callable[[LoadedModel, DeviceBatch, tuple[int, ...]], None]) -> None:
    """Call `see(model, batch, layers)` before every launch's forward (`see` may raise,
    e.g. CUDA's out-of-memory error, as the forward would)."""
    forward = embed.forward_states

    def seeing(model: LoadedModel, batch: DeviceBatch, layers: tuple[int, ...]
               ) -> torch.Tensor:
        see(model, batch, layers)
        return forward(model, batch, layers)

    monkeypatch.setattr(embed, "forward_states", seeing)
