"""One vector per gene out of esm_all.pt, for models that key genes by symbol.

esm_all.pt keeps one row per isoform. Single-cell models want one vector per gene:
SATURN and UCE average every isoform and key the result by gene symbol; other models take
the canonical isoform. This module holds the one pooling rule every per-gene consumer
shares (the AnnData writer too) and the three per-gene export formats:

    saturn   torch.save({SYMBOL: float32 tensor [E]})  what SATURN's and UCE's loaders read
    npz      numpy arrays: genes, symbols, protein_ids, n_isoforms, vectors [G, E] float32
    parquet  one row per gene: gene, symbol, protein_id, n_isoforms, vector (E float32)

`esm2-batch export` writes a fourth, h5 (one dataset per protein id, outputs/h5.py), so
`export_format` names all four and the suffixes that imply them: a format error lists
every format the command takes, wherever the choice is made.

Pooling is load_esm_matrix's (nn.py), restated here because nn.py is the torch.nn side of
the package and this one must not depend on it: "canonical" takes a gene's first row (the
file puts the canonical isoform first), "mean" averages all of the gene's rows in float32.
Genes are matched to file keys exactly first, then through the gene-list reader's ID key
(version suffix and case ignored), as load_esm_matrix does; tests pin the two to the bit.

Symbols for the saturn keys: a query that is a symbol is its own key (it is what the
user's var_names hold); a query that is an Ensembl ID takes `meta["symbols"][query]`, which
the pipeline records, or a mapping the caller passes. An ID without a symbol is left out
and counted, never written under its ID: SATURN and UCE match keys against var_names
symbols, so an ID key would silently match nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from esm2_batch.errors import InputError, StoreError, name_some
from esm2_batch.records import is_ensembl_gene_id
from esm2_batch.store.atomic import atomic_save, atomic_write, check_writable
from esm2_batch.store.esm_file import (
    GENE_POOLINGS,
    EsmFile,
    GeneVectors,
    gene_vectors,
    read_esm_file,
)

__all__ = [
    "EXPORT_FORMATS",
    "GENE_FORMATS",
    "GENE_POOLINGS",
    "ExportResult",
    "GeneVectors",
    "export_format",
    "export_genes",
    "gene_symbols",
    "gene_vectors",
]

GENE_FORMATS = ("saturn", "npz", "parquet")
"""What export_genes writes: one vector per gene."""
EXPORT_FORMATS = (*GENE_FORMATS, "h5")
"""What `esm2-batch export` writes: the per-gene formats and h5 (outputs/h5.py)."""
ExportFormat = Literal["saturn", "npz", "parquet"]
KeyCase = Literal["upper", "as_is"]
_SUFFIX_FORMATS = {".pt": "saturn", ".pth": "saturn", ".npz": "npz", ".parquet": "parquet",
                   ".h5": "h5", ".hdf5": "h5"}
_SUFFIXES = ".pt (saturn), .npz, .parquet or .h5"
_PARQUET_HINT = "pip install 'esm2-batch[parquet]' (pyarrow), or use --format npz"


# ------------------------------------------------------------------------- symbols


def gene_symbols(esm: EsmFile, genes: Sequence[str] | None = None,
                 symbols: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The symbol of each gene: the caller's mapping, else the query itself when it is a
    symbol, else meta["symbols"][query] (what Ensembl called that ID), else None."""
    recorded = esm.meta.get("symbols") or {}
    given = symbols or {}
    out: dict[str, str | None] = {}
    for gene in (esm.genes if genes is None else genes):
        symbol = given.get(gene)
        if symbol is None and not is_ensembl_gene_id(gene):
            symbol = gene
        if symbol is None:
            symbol = recorded.get(gene) if isinstance(recorded, Mapping) else None
        out[gene] = str(symbol) if symbol else None
    return out


# ------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and what it left out, with names so the CLI can say why."""

    out: Path
    fmt: str
    gene_pooling: str
    written: int
    without_protein: tuple[str, ...]  # status no_protein / not_found, or not in the file
    without_symbol: tuple[str, ...]  # saturn only: an ID query with no known symbol
    duplicate_keys: tuple[str, ...]  # saturn only: a later gene whose key was taken
    not_canonical: tuple[str, ...] = ()  # canonical pooling took a non-canonical first row

    def lines(self) -> list[str]:
        """A short closing report for the CLI."""
        lines = [f"wrote {self.written} genes ({self.gene_pooling} pooling) to {self.out} "
                 f"as {self.fmt}"]
        for label, names in (("without protein (left out)", self.without_protein),
                             ("Ensembl IDs without a symbol (left out)", self.without_symbol),
                             ("symbols already taken (left out)", self.duplicate_keys),
                             ("canonical isoform not returned by Ensembl, first isoform used",
                              self.not_canonical)):
            if names:
                lines.append(f"{label}: {len(names)} ({name_some(names)})")
        if self.without_symbol:
            lines.append("  the file records no symbol for these IDs (meta['symbols']); pass "
                         "symbols= (e.g. H5adGenes.symbol_map()) or re-run esm2-batch")
        return lines


def export_genes(
    esm: EsmFile | str | os.PathLike[str],
    *,
    fmt: str | None = None,
    gene_pooling: str = "canonical",
    out: str | os.PathLike[str],
    symbols: Mapping[str, str] | None = None,
    key_case: KeyCase = "upper",
    include_missing: bool = False,
    key: str = "emb",
) -> ExportResult:
    """Write one vector per gene of an esm_all.pt as saturn, npz or parquet.

    `key` is the matrix exported: "emb", or a further one ("emb_max_layer20", ...).

    `fmt` None infers the format from the suffix of `out` (.pt, .npz, .parquet). Genes
    without a protein are left out (include_missing=True keeps them as zero rows in npz
    and parquet; saturn refuses it, InputError: SATURN's and UCE's loaders would take a
    zero vector for a protein's). A missing or unreadable `esm` is a bad input
    (InputError), as is a `key` the file does not hold. For
    saturn, `key_case="upper"` writes upper-case symbols; SATURN's and UCE's loaders
    lower-case both their keys and var_names, so the case only matters to other readers.
    Written to a temporary name and renamed: a crash leaves no half-written file.
    """
    out_path = Path(out)
    fmt = export_format(fmt, out_path)
    if fmt == "h5":
        raise InputError("h5 holds one dataset per protein id, not one vector per gene: "
                         "use esm2_batch.outputs.h5.export_h5 (esm2-batch export --format h5)")
    if include_missing and fmt == "saturn":
        raise InputError("--include_missing keeps genes without protein as zero rows in npz "
                         "and parquet only, not in saturn: SATURN and UCE would read a zero "
                         "vector as that gene's protein; leave it out, or use --format npz "
                         "or parquet")
    data = _read_input(esm, key)
    check_writable(out_path, flag="--out", example="genes.npz")  # exit 6, as every output
    vectors = gene_vectors(data, gene_pooling=gene_pooling)
    missing = tuple(g for g, p in zip(vectors.genes, vectors.has_protein.tolist(),
                                      strict=True) if not p)
    if fmt == "saturn":
        result = _export_saturn(data, vectors, out_path, symbols, key_case, missing)
        return replace(result, not_canonical=vectors.not_canonical)
    keep = [i for i, p in enumerate(vectors.has_protein.tolist()) if p or include_missing]
    names = gene_symbols(data, vectors.genes, symbols)
    table = _table(vectors, names, keep)
    writer = _write_npz if fmt == "npz" else _write_parquet
    writer(out_path, table, _export_meta(data, vectors))
    return ExportResult(out_path, fmt, gene_pooling, len(keep),
                        () if include_missing else missing, (), (), vectors.not_canonical)


def export_format(fmt: str | None, out: str | os.PathLike[str]) -> str:
    """`fmt`, or the format `out`'s suffix implies, checked against every format the
    export command writes (EXPORT_FORMATS, h5 included); InputError naming them all."""
    if fmt is None:
        path = Path(out)
        inferred = _SUFFIX_FORMATS.get(path.suffix.lower())
        if inferred is None:
            raise InputError(f"{path}: cannot tell the format from the suffix "
                             f"{path.suffix or '(none)'!r}; name the file {_SUFFIXES}, or "
                             f"pass --format {'|'.join(EXPORT_FORMATS)}")
        return inferred
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"--format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    return fmt


def _read_input(esm: EsmFile | str | os.PathLike[str], key: str) -> EsmFile:
    """The export's input and its `key` matrix. A file that is missing, unreadable or
    without that matrix is a bad input (InputError, exit 2), not a broken output."""
    try:
        return (esm if isinstance(esm, EsmFile) else read_esm_file(esm)).select(key)
    except StoreError as exc:
        raise InputError(str(exc)) from None


def _export_saturn(data: EsmFile, vectors: GeneVectors, out: Path,
                   symbols: Mapping[str, str] | None, key_case: KeyCase,
                   missing: tuple[str, ...]) -> ExportResult:
    """{symbol: tensor}; one key per symbol whatever its case (the readers fold case)."""
    if key_case not in ("upper", "as_is"):
        raise InputError(f"key_case must be 'upper' or 'as_is'; got {key_case!r}")
    names = gene_symbols(data, vectors.genes, symbols)
    mapping: dict[str, torch.Tensor] = {}
    taken: set[str] = set()
    no_symbol: list[str] = []
    duplicates: list[str] = []
    for i, (gene, has) in enumerate(zip(vectors.genes, vectors.has_protein.tolist(),
                                        strict=True)):
        if not has:
            continue
        symbol = names[gene]
        if symbol is None:
            no_symbol.append(gene)
            continue
        if symbol.casefold() in taken:
            duplicates.append(gene)
            continue
        taken.add(symbol.casefold())
        mapping[symbol.upper() if key_case == "upper" else symbol] = vectors.matrix[i].clone()
    atomic_save(mapping, out)
    return ExportResult(out, "saturn", vectors.gene_pooling, len(mapping), missing,
                        tuple(no_symbol), tuple(duplicates))


@dataclass(frozen=True)
class _Table:
    genes: list[str]
    symbols: list[str | None]
    protein_ids: list[str | None]
    n_isoforms: list[int]
    vectors: np.ndarray  # [G, E] float32


def _table(vectors: GeneVectors, symbols: Mapping[str, str | None], keep: list[int]) -> _Table:
    return _Table(
        genes=[vectors.genes[i] for i in keep],
        symbols=[symbols.get(vectors.genes[i]) for i in keep],
        protein_ids=[vectors.protein_ids[i] for i in keep],
        n_isoforms=[vectors.n_isoforms[i] for i in keep],
        vectors=vectors.matrix[keep].numpy().astype(np.float32, copy=False))


def _export_meta(data: EsmFile, vectors: GeneVectors) -> dict[str, Any]:
    """Provenance carried inside npz and parquet files (plain JSON)."""
    keys = ("model", "layer", "pooling", "matrix", "truncation", "species",
            "ensembl_release", "created")
    meta = {k: data.meta.get(k) for k in keys if k in data.meta}
    return {**meta, "gene_pooling": vectors.gene_pooling, "dim": int(vectors.matrix.shape[1])}


def _write_npz(out: Path, table: _Table, meta: dict[str, Any]) -> None:
    """Plain unicode and numeric arrays only: np.load works without allow_pickle."""
    arrays = {
        "genes": np.array(table.genes, dtype=str),
        "symbols": np.array([s or "" for s in table.symbols], dtype=str),
        "protein_ids": np.array([p or "" for p in table.protein_ids], dtype=str),
        "n_isoforms": np.array(table.n_isoforms, dtype=np.int32),
        "vectors": table.vectors,
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }
    atomic_write(out, lambda handle: np.savez(handle, allow_pickle=False, **arrays))


def _write_parquet(out: Path, table: _Table, meta: dict[str, Any]) -> None:
    """vector is a fixed_size_list<float32>[E] column; provenance in the schema metadata."""
    pa, pq = _import_pyarrow()
    dim = table.vectors.shape[1]
    flat = pa.array(table.vectors.reshape(-1), type=pa.float32())
    arrow = pa.table({
        "gene": pa.array(table.genes, type=pa.string()),
        "symbol": pa.array(table.symbols, type=pa.string()),
        "protein_id": pa.array(table.protein_ids, type=pa.string()),
        "n_isoforms": pa.array(table.n_isoforms, type=pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
    }).replace_schema_metadata({"esm2": json.dumps(meta, sort_keys=True)})
    atomic_write(out, lambda handle: pq.write_table(arrow, handle))


def _import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"--format parquet needs pyarrow: {_PARQUET_HINT}") from exc
    return pa, pq

