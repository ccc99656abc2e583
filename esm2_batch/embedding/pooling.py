"""Pooling a whole launch at once on the device, one copy to the host, and folding the
landed rows into each sequence's result.

`pool_batch` turns a launch's (n_layers, rows, E) states into every piece's pooled
vectors by segment (index_add, scatter_reduce: one kernel per pooler and layer, never a
Python loop over sequences), plus the residue states where someone needs them (per_tok,
pooling "per_residue", max/std over windows). The vectors and two flags per piece (a
non-finite vector; a non-finite residue state) are one float32 tensor: `send` copies it,
and the residue states, to the host once (pinned, non_blocking, with an event on CUDA),
so the embedder launches the next batch before it waits for these rows (`Flight.land`).
Per_tok states stay in the compute dtype (fp16 on CUDA) until the residue store writes
them. Each landed piece is cloned out of the batch's buffers, so a row or a residue
tensor kept by a caller never keeps a batch's (pinned) memory alive.

`SequencePool` is one sequence's result, folded in piece by piece on the host: one piece
(the usual case) hands over its landed rows; the windows of a long protein add their
shares (the device already divided by the coverage and the length), and max, std and
per_residue are taken over the window-averaged residue states held on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from esm2_batch.embedding.batch import DeviceBatch, HostBatch
from esm2_batch.embedding.batching import window_coverage
from esm2_batch.embedding.options import EmbedOptions

RESIDUE_POOLERS = frozenset({"per_residue", "max", "std"})
"""Poolers that need every residue's state (in window mode: held until the last window)."""
FLAGS = 2
"""Columns after the vectors in a launch's payload: non-finite vector, non-finite residue."""


def vector_poolers(options: EmbedOptions) -> tuple[str, ...]:
    """The poolers that give one vector per protein (all but "per_residue")."""
    return tuple(p for p in options.poolers if p != "per_residue")


def needs_residues(options: EmbedOptions, batch: HostBatch) -> bool:
    """Whether a launch's residue states go to the host."""
    windows_need = batch.windowed and bool(RESIDUE_POOLERS.intersection(options.poolers))
    return options.per_tok or "per_residue" in options.poolers or windows_need


@dataclass(frozen=True, slots=True)
class Pooled:
    """A launch's pooled output on the device."""

    payload: torch.Tensor  # (B, n_layers * n_vector_poolers * E + FLAGS) float32
    residues: torch.Tensor | None  # (n_layers, R, E) in the states' dtype


def pool_batch(states: torch.Tensor, batch: DeviceBatch, options: EmbedOptions) -> Pooled:
    """(n_layers, rows, E) states of a launch -> every piece's vectors, layer by layer,
    each layer's poolers in `options.poolers` order, and its flags (module docstring)."""
    size = batch.host.size
    poolers = vector_poolers(options)
    keep = needs_residues(options, batch.host)
    vectors: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    residue_bad = states.new_zeros(size, dtype=torch.float32)
    for layer_states in states:
        residues = layer_states.index_select(0, batch.residue_rows)  # (R, E)
        if keep:
            kept.append(residues)
        bad = (~torch.isfinite(residues)).any(-1).to(torch.float32)  # (R,)
        residue_bad.index_add_(0, batch.residue_pieces, bad)
        if poolers:
            vectors.extend(_pool_layer(layer_states, residues, batch, poolers))
    width = states.shape[-1]
    pooled = (torch.stack(vectors, 1) if vectors
              else states.new_zeros((size, 0, width), dtype=torch.float32))  # (B, k, E)
    vector_bad = (~torch.isfinite(pooled)).flatten(1).any(1).to(torch.float32)  # (B,)
    flags = torch.stack((vector_bad, residue_bad.clamp_(max=1.0)), 1)  # (B, 2)
    payload = torch.cat((pooled.flatten(1), flags), 1)
    return Pooled(payload=payload, residues=torch.stack(kept) if kept else None)


def _pool_layer(states: torch.Tensor, residues: torch.Tensor, batch: DeviceBatch,
                poolers: tuple[str, ...]) -> list[torch.Tensor]:
    """(B, E) float32 vectors of one layer, one per pooler."""
    values = residues.float()  # (R, E)
    if batch.coverage is not None:
        values = values / batch.coverage  # each window's share of a residue
    pieces = batch.residue_pieces
    shape = (batch.host.size, values.shape[1])  # (B, E)
    mean = _segment_mean(values, batch) if {"mean", "std"} & set(poolers) else None
    out = []
    for pooler in poolers:
        if pooler == "mean":
            assert mean is not None
            out.append(mean * (batch.counts / batch.mean_divisor))  # x 1.0 for a piece alone
        elif pooler == "bos":
            out.append(states.index_select(0, batch.bos_rows).float() / batch.bos_divisor)
        elif pooler == "max":
            where = pieces[:, None].expand_as(values)
            out.append(values.new_full(shape, float("-inf")).scatter_reduce_(
                0, where, values, "amax"))
        else:  # std, population (correction 0): squares about the mean, summed in fp64
            assert mean is not None
            centred = (values - mean.index_select(0, pieces)).double()
            squares = centred.new_zeros(shape).index_add_(0, pieces, centred.square_())
            out.append((squares / batch.counts).sqrt_().float())
    return out


def _segment_mean(values: torch.Tensor, batch: DeviceBatch) -> torch.Tensor:
    """(B, E) mean of each piece's (R, E) rows, by the corrected two-pass algorithm: an
    index_add sums rows one after another (a 1,022-residue mean then drifts ~5x further
    from the exact one than torch.mean's pairwise sum), so the mean of the rows centred
    on the first estimate is added back, which leaves it closer than torch.mean."""
    pieces = batch.residue_pieces
    zeros = values.new_zeros(batch.host.size, values.shape[1])
    mean = zeros.index_add(0, pieces, values) / batch.counts
    centred = values - mean.index_select(0, pieces)
    return mean.add_(zeros.index_add_(0, pieces, centred) / batch.counts)


@dataclass(frozen=True, slots=True)
class Landed:
    """One piece's share of a landed launch, cloned out of the batch's buffers."""

    rows: torch.Tensor  # (n_layers * n_vector_poolers, E) float32
    residues: torch.Tensor | None  # (n_layers, n, E), the compute dtype
    bad_vector: bool
    bad_residue: bool


@dataclass(slots=True)
class Flight:
    """A launch on its way to the host: its payload and residues (pinned host buffers
    on CUDA, written by copies not yet waited for), the event after them, and the
    host batch that says where each piece lies."""

    batch: HostBatch
    payload: torch.Tensor
    residues: torch.Tensor | None
    event: torch.cuda.Event | None = None

    def land(self, vectors: int, width: int) -> list[Landed]:
        """Wait for the copies, then hand every piece its rows (`vectors` of `width`):
        one read of the flags (a host tensor by now) is the batch's only Python read."""
        if self.event is not None:
            self.event.synchronize()
        flags = self.payload[:, -FLAGS:].tolist()
        offsets = self.batch.residue_offsets()
        out = []
        for b, (bad_vector, bad_residue) in enumerate(flags):
            rows = self.payload[b, : vectors * width].view(vectors, width).clone()
            residues = None
            if self.residues is not None:
                residues = self.residues[:, offsets[b] : offsets[b + 1]].clone()
            out.append(Landed(rows=rows, residues=residues, bad_vector=bad_vector > 0,
                              bad_residue=bad_residue > 0))
        return out


def send(pooled: Pooled, batch: HostBatch) -> Flight:
    """Start the copy of a launch's pooled output to the host (module docstring)."""
    if pooled.payload.device.type != "cuda":
        return Flight(batch=batch, payload=pooled.payload, residues=pooled.residues)
    payload = _to_pinned(pooled.payload)
    residues = None if pooled.residues is None else _to_pinned(pooled.residues)
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves it untyped
    event.record()
    return Flight(batch=batch, payload=payload, residues=residues, event=event)


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


@dataclass(slots=True)
class SequencePool:
    """One unique sequence's result, folded in piece by piece (module docstring)."""

    windows: tuple[tuple[int, int], ...]
    options: EmbedOptions
    layers: int  # how many layers each piece brings
    length: int = field(init=False)  # residues kept (truncation applied)
    pending: int = field(init=False)  # pieces not yet folded in
    rows: torch.Tensor | None = None  # (n_layers * n_vector_poolers, E): landed or summed
    residues: list[torch.Tensor] = field(default_factory=list)  # per layer (L, E)
    out_of_memory: bool = False
    bad_vector: bool = False
    bad_residue: bool = False
    coverage: torch.Tensor | None = None  # (L, 1) windows per residue; None for one piece
    counts: list[int] = field(default_factory=list)  # the same, on the host as numbers

    def __post_init__(self) -> None:
        self.length = self.windows[-1][1]
        self.pending = len(self.windows)
        if len(self.windows) > 1:
            self.counts = window_coverage(self.length, self.windows)
            self.coverage = torch.tensor(self.counts, dtype=torch.float32)[:, None]  # (L, 1)

    def coverage_of(self, start: int, end: int) -> list[float] | None:
        """Coverage of residues [start, end) for a window's launch; None for one piece."""
        return None if self.coverage is None else [float(c) for c in self.counts[start:end]]

    def add(self, start: int, landed: Landed | None) -> None:
        """Fold in the piece starting at residue `start`; None: out of memory alone."""
        self.pending -= 1
        if landed is None:
            self.out_of_memory = True
            return
        self.bad_vector |= landed.bad_vector
        self.bad_residue |= landed.bad_residue
        if self.coverage is None:  # one piece: its rows and states are the result
            self.rows = landed.rows
            if landed.residues is not None:
                self.residues = list(landed.residues.unbind(0))
            return
        self.rows = landed.rows if self.rows is None else self.rows + landed.rows
        if landed.residues is not None:
            if not self.residues:
                width = landed.residues.shape[-1]
                self.residues = [torch.zeros(self.length, width) for _ in range(self.layers)]
            end = start + landed.residues.shape[1]
            for total, states in zip(self.residues, landed.residues, strict=True):
                total[start:end] += states.float() / self.coverage[start:end]

    def result(self) -> tuple[torch.Tensor, ...]:
        """Every (layer, pooler) vector on the CPU, in `EmbedOptions.matrices` order."""
        poolers = vector_poolers(self.options)
        out = []
        for k in range(self.layers):
            for pooler in self.options.poolers:
                if pooler == "per_residue":
                    out.append(self.residues[k].float())
                elif self.coverage is not None and pooler in RESIDUE_POOLERS:
                    out.append(pool_residues(pooler, self.residues[k]))
                else:
                    assert self.rows is not None
                    out.append(self.rows[k * len(poolers) + poolers.index(pooler)])
        return tuple(out)

    def residue_states(self) -> tuple[torch.Tensor, ...]:
        """Every layer's [L, E] residue states (per_tok), else ()."""
        return tuple(self.residues) if self.options.per_tok else ()


def pool_residues(pooler: str, residues: torch.Tensor) -> torch.Tensor:
    """max or std over a window-averaged (L, E) float32 residue matrix."""
    if pooler == "max":
        return residues.amax(0)
    return residues.std(0, correction=0)
