"""Protein sequences -> ESM2 vectors: validate, dedupe, batch, forward, pool, check.

Two entry points share one pipeline (plan, forward, pool, check):

- `embed_sequences` returns every row at once, in input order: a float32 CPU tensor
  [n, dim] (``pooling="mean"`` or ``"bos"``) or a list of [L_i, dim] tensors
  (``"per_residue"``); with several ``repr_layers`` / ``include`` poolers, a dict of such
  matrices named "mean_layer33", "max_layer20", ... (one forward per batch serves every
  layer: `models.layer_states`).
- `iter_embeddings` yields one `Embedded` record per input as soon as its batch is done
  (completion order, longest sequences first), so a caller can write rows to disk as they
  are made; failures arrive as records too, and the rest go on.

Policies, decided once here:

- Letters: the 20 amino acids plus X, B, U, Z, O (ESM's alphabet); lowercase is
  uppercased; one trailing '*' (a translated stop codon) is dropped. Anything else,
  including '*' inside, gaps ('-', '.'), digits, J and whitespace, is an `InputError`
  naming the sequence, the character and its position, raised before any model work.
- Identical sequences (after that cleaning) are embedded once and shared.
- Long proteins: ``long_seqs="truncate"`` keeps the first `truncation` residues, as
  esm-extract does. ``"window"`` covers the whole protein with windows of
  ``min(truncation, the model's context)`` residues overlapping by a quarter window (see
  `batching.plan_windows`); each residue's state is the mean over the windows covering it,
  then pooled, so a titin costs ~46 window passes and never more memory than one.
  ``pooling="bos"`` in window mode is the mean of the windows' BOS states; max and std
  are over the window-averaged residue states (held on the CPU until the last window).
- A sequence (or window) that alone needs more than `toks_per_batch` tokens is an
  `InputError` before any model work: the budget is never exceeded silently. "auto" (the
  default) sizes it for the device (budget.py: free memory on CUDA, 4,096 elsewhere).
- The fast engine runs each batch packed, without padding (models/varlen.py); the
  budget counts its real tokens. Other encoders get padded (B, T) batches.
- Nothing in the batch loop waits for the device: token ids and every index are built
  on the host and copied once (batch.py), a batch is pooled on the device and its rows
  copied back in one transfer (pooling.py), and the next batch is launched before the
  previous one's rows are waited for. Rows and per_tok states handed out are clones
  (never views of a batch's buffers); per_tok states are in the compute dtype.
- CUDA out of memory anywhere in a batch (forward, pooling, the copy): the batch is
  halved and retried down to one sequence; a sequence that still does not fit fails
  alone (an `EmbeddingError` in its record). The size that fit is remembered for the
  model's later batches (budget.py), so they do not overflow again.
- Every row is checked for shape and finiteness (the latter on the device, with the
  batch); a bad row is an `EmbeddingError` naming the sequence. `embed_sequences` runs
  everything first, then raises one `EmbeddingError` listing all failures; use
  `iter_embeddings` to keep the rows that succeeded.
- The forward is the one the model was loaded with (``load_model(..., engine=...)``: the
  fast engine by default, fair-esm's own forward as the reference) and runs under
  ``torch.inference_mode``; returned rows are ordinary tensors, and fair-esm's rotary
  cache is rebuilt for later grad-enabled calls (see models).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

import torch

from esm2_batch.embedding.batch import DeviceBatch, HostBatch, PieceInput, build_batch
from esm2_batch.embedding.batching import SPECIAL_TOKENS, plan_batches, plan_windows, split_batch
from esm2_batch.embedding.budget import launch_limit, overflowed, sized
from esm2_batch.embedding.options import (
    AUTO_TOKENS,
    EmbedOptions,
    LongSeqs,
    Pooler,
    Pooling,
    matrix_name,
)
from esm2_batch.embedding.pooling import (
    Flight,
    Landed,
    SequencePool,
    pool_batch,
    send,
    vector_poolers,
)
from esm2_batch.embedding.sequences import RESIDUES, SequenceInput, clean_sequence, name_all
from esm2_batch.errors import EmbeddingError, InputError
from esm2_batch.models import LoadedModel, layer_states, representations


@dataclass(frozen=True, slots=True)
class Embedded:
    """One input's outcome: its row (float32, CPU) or the error that stopped it.

    `row` is the first (pooler, layer) of `EmbedOptions.matrices`; `rows` holds every one
    of them in that order (``rows[0] is row``), empty on failure. With
    ``EmbedOptions.per_tok``, `residues` holds every residue's state, [L, dim] on the CPU
    in the compute dtype (float16 on CUDA stays float16 until the residue store writes
    it; float32 for windows, which are averaged), one per layer in
    `EmbedOptions.layer_indices` order (BOS, EOS and padding removed: fair-esm's
    ``representations[layer][i, 1:L+1]``)."""

    index: int
    name: str
    row: torch.Tensor | None
    error: EmbeddingError | None = None
    rows: tuple[torch.Tensor, ...] = ()
    residues: tuple[torch.Tensor, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def packed(self) -> torch.Tensor | None:
        """Every pooled vector of the row side by side, [n_matrices * dim] (the layout the
        run's stores keep); `row` itself when there is one matrix."""
        if self.row is None or len(self.rows) <= 1:
            return self.row
        return torch.cat(self.rows)


@dataclass(frozen=True, slots=True)
class _Piece:
    """Residues [start, end) of unique sequence `item`: one row of one forward pass."""

    item: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class _Job:
    """The validated, deduplicated plan of one call; built before any model work."""

    names: list[str]  # per input
    owners: list[list[int]]  # unique sequence -> indices of the inputs that carry it
    tokens: list[torch.Tensor]  # unique sequence -> residue token ids (uint8)
    windows: list[tuple[tuple[int, int], ...]]  # unique sequence -> its pieces' ranges
    pieces: list[_Piece]
    batches: tuple[tuple[int, ...], ...]  # indices into `pieces`


def embed_sequences(
    model: LoadedModel,
    sequences: Sequence[SequenceInput],
    *,
    toks_per_batch: int | Literal["auto"] = "auto",
    batch_size: int | None = None,
    truncation: int | None = None,
    long_seqs: LongSeqs = "truncate",
    pooling: Pooling = "mean",
    repr_layer: int = -1,
    repr_layers: Sequence[int] = (),
    include: Sequence[Pooler] = (),
) -> (torch.Tensor | list[torch.Tensor] | dict[str, torch.Tensor]
      | dict[str, list[torch.Tensor]]):
    """Embed `sequences` and return their rows in input order (see the module docstring).

    With several `repr_layers` or `include` poolers, a dict of [n, dim] matrices named by
    `options.matrix_name` ("mean_layer33", "max_layer20", ...), in `EmbedOptions.matrices`
    order; otherwise the one matrix (or, for "per_residue", the list) as before. For
    "per_residue" with several `repr_layers`, a dict of such lists ("per_residue_layer6":
    one [L, dim] per input), every layer's states, never only the first.
    Raises `InputError` before any model work for bad letters or options, and one
    `EmbeddingError` naming every sequence that failed after all others have run.
    """
    options = EmbedOptions(toks_per_batch=_budget(toks_per_batch), batch_size=batch_size,
                           truncation=truncation, long_seqs=long_seqs, repr_layer=repr_layer,
                           pooling=pooling, repr_layers=tuple(repr_layers),
                           include=tuple(include))
    results = list(embed_rows(model, sequences, options))
    _raise_failures([r.error for r in results if r.error is not None])
    matrices = options.matrices(name=model.name, num_layers=model.num_layers)
    columns: list[list[torch.Tensor]] = [[torch.empty(0)] * len(results) for _ in matrices]
    for result in results:
        for column, row in zip(columns, result.rows, strict=True):
            column[result.index] = row
    if pooling == "per_residue" and not include:  # [L, dim] per input, not one matrix
        if len(matrices) == 1:
            return columns[0]
        return {matrix_name(m): column for m, column in zip(matrices, columns, strict=True)}
    stacked = [torch.stack(c) if c else torch.empty(0, model.embed_dim) for c in columns]
    if len(matrices) == 1:
        return stacked[0]
    return {matrix_name(m): rows for m, rows in zip(matrices, stacked, strict=True)}


def iter_embeddings(
    model: LoadedModel,
    sequences: Sequence[SequenceInput],
    *,
    toks_per_batch: int | Literal["auto"] = "auto",
    batch_size: int | None = None,
    truncation: int | None = None,
    long_seqs: LongSeqs = "truncate",
    pooling: Pooling = "mean",
    repr_layer: int = -1,
    repr_layers: Sequence[int] = (),
    include: Sequence[Pooler] = (),
) -> Iterator[Embedded]:
    """Validate and plan now, then yield an `Embedded` per input as its batch finishes.

    Validation is eager (an `InputError` is raised by this call, not by the first
    ``next``); every input is yielded exactly once, in completion order. With several
    layers or poolers each record's `rows` holds them all (`EmbedOptions.matrices` order).
    """
    options = EmbedOptions(toks_per_batch=_budget(toks_per_batch), batch_size=batch_size,
                           truncation=truncation, long_seqs=long_seqs, repr_layer=repr_layer,
                           pooling=pooling, repr_layers=tuple(repr_layers),
                           include=tuple(include))
    return embed_rows(model, sequences, options)


def _budget(toks_per_batch: int | Literal["auto"]) -> int:
    return AUTO_TOKENS if toks_per_batch == "auto" else toks_per_batch


def embed_rows(model: LoadedModel, sequences: Sequence[SequenceInput],
               options: EmbedOptions) -> Iterator[Embedded]:
    """`iter_embeddings` with its options as one object (what the run's stages pass)."""
    options = sized(options, model)
    options.check(name=model.name, num_layers=model.num_layers,
                  max_residues=model.max_residues)
    layers = options.layer_indices(name=model.name, num_layers=model.num_layers)
    job = _plan(model, sequences, options)
    return _run(model, job, options, layers)


def _plan(model: LoadedModel, sequences: Sequence[SequenceInput], options: EmbedOptions) -> _Job:
    """Clean, dedupe, cut into pieces and batch: everything that can fail before the model."""
    named = name_all(sequences)
    unique: dict[str, int] = {}
    owners: list[list[int]] = []
    for index, (name, raw) in enumerate(named):
        item = unique.setdefault(clean_sequence(raw, name=name), len(unique))
        if item == len(owners):
            owners.append([])
        owners[item].append(index)
    windows = [_ranges(len(seq), options, model.max_residues) for seq in unique]
    pieces = [_Piece(item, start, end)
              for item, ranges in enumerate(windows) for start, end in ranges]
    plan = plan_batches([p.length for p in pieces], toks_per_batch=options.toks_per_batch,
                        batch_size=options.batch_size, packed=model.fast is not None)
    names = [name for name, _ in named]
    if plan.oversize:
        _raise_oversize([pieces[i] for i in plan.oversize], owners, names, options)
    table = _token_table(model)
    tokens = [_encode(seq, table) for seq in unique]
    return _Job(names=names, owners=owners, tokens=tokens, windows=windows, pieces=pieces,
                batches=plan.batches)


def _ranges(length: int, options: EmbedOptions, context: int) -> tuple[tuple[int, int], ...]:
    """The residue ranges one sequence is embedded from, per the long-sequence policy;
    windows never exceed the model's own `context` (its max_residues)."""
    if options.long_seqs == "window":
        return plan_windows(length, window=min(options.cut, context))
    return ((0, min(length, options.cut)),)


def _raise_oversize(
    pieces: list[_Piece], owners: list[list[int]], names: list[str], options: EmbedOptions
) -> NoReturn:
    """Name the sequences that alone exceed the token budget, and what to change."""
    shown = sorted({names[owners[p.item][0]] for p in pieces})
    need = max(p.length for p in pieces) + SPECIAL_TOKENS
    more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
    raise InputError(
        f"sequence(s) {', '.join(shown[:5])}{more} need up to {need} tokens (residues + "
        f"BOS + EOS) but toks_per_batch is {options.toks_per_batch}: raise toks_per_batch "
        f"to at least {need} or lower truncation"
    )


def _token_table(model: LoadedModel) -> torch.Tensor:
    """ASCII code -> token id for every residue letter (other codes never get here)."""
    table = torch.zeros(128, dtype=torch.uint8)
    for letter in RESIDUES:
        table[ord(letter)] = model.alphabet.get_idx(letter)
    return table


def _encode(sequence: str, table: torch.Tensor) -> torch.Tensor:
    """A cleaned sequence as token ids, vectorised (titin in microseconds)."""
    codes = torch.frombuffer(bytearray(sequence.encode("ascii")), dtype=torch.uint8)
    return table[codes.long()]


def _run(model: LoadedModel, job: _Job, options: EmbedOptions, layers: tuple[int, ...]
         ) -> Iterator[Embedded]:
    """Run the planned batches and yield every input once its sequence is complete.

    Each launch is sent before the previous one is landed: the device computes batch
    i + 1 while the host waits for batch i's rows and hands them on."""
    pools = [SequencePool(windows, options, len(layers)) for windows in job.windows]
    previous: _Launch | None = None
    for batch in job.batches:
        for group in _within_limit(model, [job.pieces[i] for i in batch]):
            for launch in _launch(model, job, pools, group, layers, options):
                if previous is not None:
                    yield from _land(model, job, pools, previous, options, layers)
                previous = launch
    if previous is not None:
        yield from _land(model, job, pools, previous, options, layers)


_Launch = tuple[list[_Piece], Flight | None]
"""A launch's pieces and its rows on their way to the host (None: out of memory alone)."""


def _within_limit(model: LoadedModel, pieces: list[_Piece]) -> list[list[_Piece]]:
    """A planned batch cut to the launch limit an earlier overflow left (budget.py)."""
    limit = launch_limit(model)
    if limit is None:
        return [pieces]
    groups = split_batch([p.length for p in pieces], toks_per_batch=limit,
                         packed=model.fast is not None)
    return [[pieces[i] for i in group] for group in groups]


def _launch(model: LoadedModel, job: _Job, pools: list[SequencePool], pieces: list[_Piece],
            layers: tuple[int, ...], options: EmbedOptions) -> Iterator[_Launch]:
    """Launch `pieces`; on CUDA out of memory (forward, pooling or the copy) halve and
    retry, lowering the model's launch limit, down to a piece that fails alone."""
    batch = build_batch([_piece_input(job, pools, p) for p in pieces],
                        packed=model.fast is not None, bos=model.alphabet.cls_idx,
                        eos=model.alphabet.eos_idx, pad=model.alphabet.padding_idx)
    flight = _forward_or_none(model, batch, layers, options)
    if flight is not None or len(pieces) == 1:
        yield pieces, flight
        return
    overflowed(model, batch.token_count)
    half = len(pieces) // 2
    yield from _launch(model, job, pools, pieces[:half], layers, options)
    yield from _launch(model, job, pools, pieces[half:], layers, options)


def _piece_input(job: _Job, pools: list[SequencePool], piece: _Piece) -> PieceInput:
    """A piece's token ids and pooling divisors: a whole sequence is pooled as
    esm-extract pools it, a window contributes its share (`SequencePool`)."""
    pool = pools[piece.item]
    residues = job.tokens[piece.item][piece.start : piece.end]
    if pool.coverage is None:
        return PieceInput(residues, mean_divisor=float(piece.length), bos_divisor=1.0)
    return PieceInput(residues, mean_divisor=float(pool.length),
                      bos_divisor=float(len(pool.windows)),
                      coverage=pool.coverage_of(piece.start, piece.end))


def _forward_or_none(model: LoadedModel, batch: HostBatch, layers: tuple[int, ...],
                     options: EmbedOptions) -> Flight | None:
    """Upload, forward, pool and start the copy of one launch, or None when CUDA ran out
    of memory anywhere in it. Nothing here waits for the device."""
    try:
        with torch.inference_mode():
            on_device = batch.upload(model.device)
            states = forward_states(model, on_device, layers)
            pooled = pool_batch(states, on_device, options)
            del states  # before the copy's buffers are allocated
            return send(pooled, batch)
    except torch.cuda.OutOfMemoryError:
        pass  # retried outside the handler, so the traceback's tensors are freed first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None


def forward_states(model: LoadedModel, batch: DeviceBatch, layers: tuple[int, ...]
                   ) -> torch.Tensor:
    """(n_layers, rows, E) states of a launch from one forward: the fast engine's packed
    stream (no padding), else the encoder's (B, T) batch with its positions flattened."""
    if batch.packing is not None:
        assert model.fast is not None
        return model.fast.forward_packed(batch.tokens, batch.packing, layers)
    if len(layers) == 1:
        states = representations(model, batch.tokens, layer=layers[0]).unsqueeze(0)
    else:
        states = layer_states(model, batch.tokens, layers=layers)
    return states.flatten(1, 2)


def _land(model: LoadedModel, job: _Job, pools: list[SequencePool], launch: _Launch,
          options: EmbedOptions, layers: tuple[int, ...]) -> Iterator[Embedded]:
    """Wait for a launch's rows, fold them in, and yield the sequences they complete."""
    pieces, flight = launch
    vectors = len(layers) * len(vector_poolers(options))
    landed: list[Landed | None] = ([None] * len(pieces) if flight is None
                                   else list(flight.land(vectors, model.embed_dim)))
    for piece, got in zip(pieces, landed, strict=True):
        pool = pools[piece.item]
        pool.add(piece.start, got)
        if pool.pending == 0:
            yield from _finish(model, job, piece.item, pool)


def _finish(model: LoadedModel, job: _Job, item: int, pool: SequencePool
            ) -> Iterator[Embedded]:
    """Check the finished rows once and yield them (or the error) for every input carrying
    the sequence."""
    rows = () if pool.out_of_memory else pool.result()
    residues = () if pool.out_of_memory else pool.residue_states()
    problem = _problem(model, rows, pool) or _residue_problem(model, residues, pool)
    for index in job.owners[item]:
        name = job.names[index]
        error = EmbeddingError(f"sequence {name!r}: {problem}", name=name) if problem else None
        yield Embedded(index=index, name=name, row=None if problem else rows[0], error=error,
                       rows=() if problem else rows, residues=() if problem else residues)


def _residue_problem(model: LoadedModel, residues: tuple[torch.Tensor, ...],
                     pool: SequencePool) -> str:
    """Why per_tok states cannot be used, or "" (checked as the pooled rows are; whether
    any is non-finite was computed on the device with the batch)."""
    for states in residues:
        if tuple(states.shape) != (pool.length, model.embed_dim):
            return (f"residue states have shape {tuple(states.shape)}, expected "
                    f"{(pool.length, model.embed_dim)}")
    if residues and pool.bad_residue:
        return (f"residue states have non-finite values (NaN or Inf) in {model.dtype}; "
                f"try dtype float32")
    return ""


def _problem(model: LoadedModel, rows: tuple[torch.Tensor, ...], pool: SequencePool) -> str:
    """Why a row cannot be used, or "" when it is fine."""
    if not rows:
        return (f"out of memory on {model.device} even alone ({pool.length} residues); "
                f"lower truncation, use long_seqs='window' or a larger device")
    per_residue = pool.options.poolers == ("per_residue",)
    expected = (pool.length, model.embed_dim) if per_residue else (model.embed_dim,)
    for row in rows:
        if tuple(row.shape) != expected:
            return f"embedding has shape {tuple(row.shape)}, expected {expected}"
    if pool.bad_vector or (pool.bad_residue and (per_residue or pool.coverage is not None)):
        return (f"embedding has non-finite values (NaN or Inf) in {model.dtype}; "
                f"try dtype float32")
    return ""


def _raise_failures(errors: list[EmbeddingError]) -> None:
    """One EmbeddingError listing every failed sequence, after all others have run."""
    if not errors:
        return
    shown = "; ".join(str(e) for e in errors[:3])
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    raise EmbeddingError(f"{len(errors)} sequence(s) could not be embedded: {shown}{more}",
                         name=errors[0].name)
