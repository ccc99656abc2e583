"""esm_all.pt: the contract, its reader and writer, and the one gene-pooling rule.

Contract (DESIGN.md): a dict with `emb` (float16 [n_rows, dim]), `genes` (queries in
input order), `protein_ids` (one per row), `gene_to_isoform_indices` (every gene; [] when
it has no protein) and `meta`. Only plain types, so it loads with weights_only=True.

Further pooled matrices (several --repr_layers or --include poolers) sit beside `emb`
under keys starting "emb_" (e.g. `emb_max_layer20`), float16, one row per protein id in
the same order; meta["matrices"] maps every matrix key, `emb` included, to its pooler and
layer. `EsmFile.select(key)` gives a view whose `emb` is that matrix, so every consumer
below reads any of them the same way.

Every consumer of the file (nn.load_esm_matrix, the exporters, the .h5ad writer) matches
gene names with `EsmFile.match_rows` and pools isoforms with `gene_vectors`, so a gene's
vector is the same bits whichever tool reads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from esm2_batch.errors import InputError, StoreError, name_some
from esm2_batch.records import GeneIsoforms, query_key
from esm2_batch.store.atomic import atomic_save
from esm2_batch.store.keys import RowKeys

REQUIRED_KEYS = ("emb", "genes", "protein_ids", "gene_to_isoform_indices")
MATRIX_PREFIX = "emb_"
"""Keys of the further pooled matrices: emb_<pooler>_layer<L>."""


@dataclass(frozen=True)
class EsmFile:
    """An esm_all.pt held in memory, checked against the contract."""

    emb: torch.Tensor
    genes: list[str]
    protein_ids: list[str]
    gene_to_isoform_indices: dict[str, list[int]]
    meta: dict[str, Any] = field(default_factory=dict)
    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    """The further matrices by key ("emb_max_layer20", ...); `emb` is not among them."""

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    @property
    def keys(self) -> list[str]:
        """Every matrix key, "emb" first."""
        return ["emb", *self.matrices]

    def matrix(self, key: str = "emb") -> torch.Tensor:
        """The [n_rows, dim] matrix stored under `key`; StoreError naming the keys held."""
        if key == "emb":
            return self.emb
        if key not in self.matrices:
            raise StoreError(f"no matrix {key!r} in this file: it holds {', '.join(self.keys)}")
        return self.matrices[key]

    def select(self, key: str = "emb") -> EsmFile:
        """This file with `key`'s matrix as `emb`, so every reader takes any matrix; its
        meta's "layer" and "pooling" become that matrix's (from meta["matrices"])."""
        if key == "emb":
            return self
        described = self.meta.get("matrices", {}).get(key, {})
        facts = {"layer": described.get("layer"), "pooling": described.get("pooler")}
        meta = {**self.meta, **{k: v for k, v in facts.items() if v is not None},
                "matrix": key}
        return replace(self, emb=self.matrix(key), meta=meta)

    def rows_of(self, gene: str) -> list[int]:
        """The row indices of a gene, canonical first ([] when it has no protein)."""
        return self.gene_to_isoform_indices.get(gene, [])

    def match_rows(self, genes: Sequence[str]) -> list[list[int] | None]:
        """Each gene's row indices, None when the file does not list it.

        Exact key first, then the gene-list reader's key (Ensembl IDs without version,
        any case), so a model vocabulary of ENSG00000157764.13 finds ENSG00000157764.
        The one rule every consumer (load_esm_matrix, export, h5ad) matches names by.
        """
        index = self.gene_to_isoform_indices
        by_key: dict[str, str] = {}
        for key in index:
            by_key.setdefault(query_key(key), key)
        found: list[list[int] | None] = []
        for gene in genes:
            file_gene = gene if gene in index else by_key.get(query_key(gene))
            found.append(None if file_gene is None else index[file_gene])
        return found


def read_esm_file(path: str | os.PathLike[str]) -> EsmFile:
    """Load and validate an esm_all.pt safely (weights_only=True: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such embedding file; run esm2-batch to create it")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"{path}: not a readable esm_all.pt ({reason})") from exc
    return validate(data, source=str(path))


def validate(data: object, *, source: str = "esm_all.pt") -> EsmFile:
    """Check the contract's keys, types and index ranges; raise StoreError if broken."""
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        raise StoreError(f"{source}: not an esm_all.pt (needs keys {list(REQUIRED_KEYS)})")
    emb, protein_ids = data["emb"], list(data["protein_ids"])
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        raise StoreError(f"{source}: 'emb' must be a 2-D tensor")
    if emb.shape[0] != len(protein_ids):
        raise StoreError(f"{source}: {emb.shape[0]} rows but {len(protein_ids)} protein ids")
    index = {str(g): [int(i) for i in rows]
             for g, rows in data["gene_to_isoform_indices"].items()}
    bad = [g for g, rows in index.items() if any(not 0 <= i < emb.shape[0] for i in rows)]
    if bad:
        raise StoreError(f"{source}: row indices out of range for {bad[:5]}")
    return EsmFile(emb=emb, genes=[str(g) for g in data["genes"]], protein_ids=protein_ids,
                   gene_to_isoform_indices=index, meta=dict(data.get("meta", {})),
                   matrices=_further_matrices(data, emb, source))


def _further_matrices(data: dict[str, Any], emb: torch.Tensor, source: str
                      ) -> dict[str, torch.Tensor]:
    """The emb_* matrices, each checked to have `emb`'s rows."""
    found = {str(k): v for k, v in data.items() if str(k).startswith(MATRIX_PREFIX)}
    for key, matrix in found.items():
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or (
                matrix.shape[0] != emb.shape[0]):
            raise StoreError(f"{source}: {key!r} must be a 2-D tensor with {emb.shape[0]} rows")
    return found


RowChunks = Iterable[tuple[Sequence[str], torch.Tensor]]
"""(keys, rows) one chunk at a time, as PartialStore.row_chunks reads them."""


def assemble(
    genes: Sequence[str],
    records: Mapping[str, GeneIsoforms],
    rows: Mapping[str, torch.Tensor] | RowChunks,
    *,
    keys: RowKeys,
    dim: int,
    meta: dict[str, Any],
    reused: EsmFile | None = None,
    matrices: Sequence[str] = ("emb",),
) -> dict[str, Any]:
    """Build the contract's dict: rows gene by gene in input order, canonical first.

    A gene with a fresh record takes its rows from `rows` (by `keys`); one without takes
    them from `reused` (an earlier esm_all.pt made with the same settings). A row of
    `rows` holds the `matrices` side by side ([len(matrices) * dim], the partial store's
    layout); each becomes its own float16 matrix under its key, rows in the same order.

    `rows` is a mapping by key, or chunks read one at a time (PartialStore.row_chunks):
    the matrices are allocated once at their final size and each chunk is copied in and
    dropped, so a whole proteome never holds its rows twice (stored chunks plus a
    stacked copy) while the file is assembled.
    """
    protein_ids: list[str] = []
    index: dict[str, list[int]] = {}
    fresh: dict[str, list[int]] = {}  # row key -> the output rows it fills
    old: list[tuple[int, int]] = []  # (output row, reused file's row)
    for gene in genes:
        first = len(protein_ids)
        record = records.get(gene)
        if record is not None:
            for iso in record.isoforms:
                fresh.setdefault(keys.of(iso.sequence), []).append(len(protein_ids))
                protein_ids.append(iso.protein_id)
        elif reused is not None and gene in reused.gene_to_isoform_indices:
            for i in reused.rows_of(gene):
                old.append((len(protein_ids), i))
                protein_ids.append(reused.protein_ids[i])
        else:
            raise StoreError(f"internal: gene {gene!r} has neither a record nor a reused row")
        index[gene] = list(range(first, len(protein_ids)))
    out = {key: torch.empty(len(protein_ids), dim, dtype=torch.float16) for key in matrices}
    if reused is not None and old:
        dst = torch.tensor([d for d, _ in old], dtype=torch.long)
        src = torch.tensor([s for _, s in old], dtype=torch.long)
        for key in matrices:
            out[key].index_copy_(0, dst, reused.matrix(key).index_select(0, src).to(
                torch.float16))
    chunks = _as_chunks(rows, fresh)
    missing = set(fresh)
    for chunk_keys, emb in chunks:
        dst_rows: list[int] = []
        src_rows: list[int] = []
        for i, key in enumerate(chunk_keys):
            targets = fresh.get(key)
            if targets:
                dst_rows += targets
                src_rows += [i] * len(targets)
                missing.discard(key)
        if dst_rows:
            picked = emb.index_select(0, torch.tensor(src_rows, dtype=torch.long))
            dst = torch.tensor(dst_rows, dtype=torch.long)
            for n, key in enumerate(matrices):
                out[key].index_copy_(0, dst, picked[:, n * dim:(n + 1) * dim].to(torch.float16))
    if missing:
        raise StoreError(f"{len(missing)} embedded rows are missing from the unfinished run "
                         "(a damaged rows chunk was dropped?); rerun the same command to "
                         "embed them again")
    return {**out, "genes": list(genes),
            "protein_ids": protein_ids, "gene_to_isoform_indices": index, "meta": meta}


def _as_chunks(rows: Mapping[str, torch.Tensor] | RowChunks, wanted: Mapping[str, object]
               ) -> RowChunks:
    """Chunks as they are; a mapping as one chunk of the rows `wanted` (small callers)."""
    if not isinstance(rows, Mapping):
        return rows
    present = [key for key in wanted if key in rows]
    if not present:
        return []
    return [(present, torch.stack([rows[key] for key in present]))]


def write_esm_file(path: Path, data: dict[str, Any]) -> EsmFile:
    """Validate, then write atomically: a crash never leaves a half-written esm_all.pt."""
    checked = validate(data, source=str(path))
    atomic_save(data, path)
    return checked


# -- one vector per gene ---------------------------------------------------------------------
GenePooling = Literal["canonical", "mean"]
GENE_POOLINGS: tuple[GenePooling, ...] = ("canonical", "mean")


@dataclass(frozen=True)
class GeneVectors:
    """One pooled vector per gene, aligned with `genes`.

    `protein_ids[i]` is the ENSP of gene i's first row: its canonical isoform whenever the
    canonical has a sequence (otherwise the longest), whatever the pooling; None without
    protein. `in_file[i]` is False for a gene the file does not list at all.
    `not_canonical` names the genes whose "canonical" vector is not their canonical
    isoform's, because Ensembl did not return that sequence (meta['canonical_missing']):
    consumers say so instead of passing the longest isoform off as the canonical one.
    """

    genes: tuple[str, ...]
    matrix: torch.Tensor  # [G, E] float32, zero rows where has_protein is False
    has_protein: torch.Tensor  # [G] bool
    protein_ids: tuple[str | None, ...]
    n_isoforms: tuple[int, ...]
    in_file: tuple[bool, ...]
    gene_pooling: str
    not_canonical: tuple[str, ...] = ()


def gene_vectors(esm: EsmFile, genes: Sequence[str] | None = None, *,
                 gene_pooling: str = "canonical", source: str = "esm_all.pt") -> GeneVectors:
    """Pool each gene's isoform rows into one float32 vector (default: the file's genes).

    `canonical` takes the gene's first row (the canonical isoform), `mean` averages all
    of its isoforms in float32 (as SATURN and UCE do). Genes are matched by
    `EsmFile.match_rows`. Raises InputError for an unknown pooling, StoreError for
    non-finite values in the rows used (a NaN vector would poison every model reading it).
    """
    check_gene_pooling(gene_pooling)
    names = list(esm.genes if genes is None else _as_names(genes))
    found = esm.match_rows(names)
    rows = [r or [] for r in found]
    chosen = [r[:1] if gene_pooling == "canonical" else r for r in rows]
    matrix = _mean_rows(esm.emb, chosen)  # [G, E] float32
    check_finite(matrix, names, source=source)
    return GeneVectors(
        genes=tuple(names), matrix=matrix,
        has_protein=torch.tensor([bool(r) for r in rows], dtype=torch.bool),
        protein_ids=tuple(esm.protein_ids[r[0]] if r else None for r in rows),
        n_isoforms=tuple(len(r) for r in rows),
        in_file=tuple(f is not None for f in found), gene_pooling=gene_pooling,
        not_canonical=_not_canonical(esm, names, rows) if gene_pooling == "canonical" else ())


def _not_canonical(esm: EsmFile, names: Sequence[str], rows: Sequence[Sequence[int]]
                   ) -> tuple[str, ...]:
    """The genes whose first row is not their canonical isoform (see GeneVectors)."""
    recorded = esm.meta.get("canonical_missing")
    if not isinstance(recorded, Mapping):
        return ()
    first_rows = {esm.rows_of(str(key))[0] for key in recorded if esm.rows_of(str(key))}
    return tuple(g for g, r in zip(names, rows, strict=True) if r and r[0] in first_rows)


def check_gene_pooling(gene_pooling: str) -> None:
    """One-line error for --gene_pooling, shared by every consumer."""
    if gene_pooling not in GENE_POOLINGS:
        raise InputError(f"gene pooling must be one of {', '.join(GENE_POOLINGS)}; got "
                         f"{gene_pooling!r}")


def _mean_rows(emb: torch.Tensor, chosen: Sequence[Sequence[int]]) -> torch.Tensor:
    """Average the chosen rows of emb [R, E] per gene -> [G, E] float32; [] gives zeros.

    One index_add in float32 (not float16), divided by the count: a single row divided by
    1 is bit-exact, so canonical vectors are the file's float16 values cast to float32.
    """
    dst = torch.tensor([g for g, rows in enumerate(chosen) for _ in rows], dtype=torch.long)
    src = torch.tensor([r for rows in chosen for r in rows], dtype=torch.long)
    out = torch.zeros(len(chosen), emb.shape[1], dtype=torch.float32)  # [G, E]
    out.index_add_(0, dst, emb[src].float())
    counts = torch.bincount(dst, minlength=len(chosen)).clamp(min=1)  # [G]
    return out / counts.unsqueeze(1).to(out.dtype)


def check_finite(matrix: torch.Tensor, genes: Sequence[str], *, source: str) -> None:
    """A NaN row would turn every loss it touches into NaN: name the genes instead."""
    bad = (~torch.isfinite(matrix).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        names = [genes[i] for i in bad]
        raise StoreError(f"{source}: non-finite ESM values for {len(bad)} genes "
                         f"({name_some(names)}); re-embed them (rerun esm2-batch with "
                         "--overwrite)")


def _as_names(genes: Sequence[str]) -> list[str]:
    if isinstance(genes, str):
        raise InputError(f"genes must be a list of gene names, not the string {genes!r}")
    return [str(g) for g in genes]
