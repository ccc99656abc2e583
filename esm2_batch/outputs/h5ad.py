"""Vectors back into AnnData: a copy of an .h5ad with

    varm["X_esm2"]           float32 [n_vars, dim], zeros for vars without a vector
    var["esm2_has_protein"]  nullable bool: True / False for the genes of the run, <NA>
                             for vars outside it (not in the gene list: unknown, not "no")
    var["esm2_protein_id"]   the ENSP of the gene's first row (its canonical isoform)
    var["esm2_n_isoforms"]   nullable int, the gene's rows in esm_all.pt; <NA> outside it
    var["esm2_not_canonical"] nullable bool: True where canonical pooling had to take the
                             first returned isoform because Ensembl did not return the
                             canonical one (store.esm_file.gene_vectors' rule, the one that
                             export and nn report too); <NA> outside the run
    uns["esm2"]              model, layer, pooling, isoform pooling, species, release,
                             the esm_all.pt read and the var column matched on, dates

The source is copied file to file and only var, varm and uns are rewritten in the copy
(anndata's element writer on h5py), so X of an atlas with millions of cells is never
loaded; the copy is published atomically (store.atomic). Var rows map to genes by the
rule of sources/h5ad_genes.py; vectors are pooled by store.esm_file.gene_vectors.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esm2_batch.errors import InputError, name_some
from esm2_batch.records import query_key
from esm2_batch.sources.h5ad_genes import (
    INDEX_NAMES,
    elem_io,
    import_anndata,
    read_var,
    var_queries,
)
from esm2_batch.store.atomic import atomic_copy, check_writable
from esm2_batch.store.esm_file import EsmFile, check_gene_pooling, gene_vectors, read_esm_file
from esm2_batch.version import package_version

__all__ = [
    "ESM_KEY",
    "H5adWriteResult",
    "VarAnnotations",
    "annotate_anndata",
    "check_h5ad_paths",
    "var_annotations",
    "write_h5ad",
]

log = logging.getLogger("esm2_batch")

ESM_KEY = "X_esm2"


@dataclass(frozen=True)
class VarAnnotations:
    """What goes into the AnnData, aligned with its var rows."""

    matrix: np.ndarray  # [n_vars, dim] float32
    has_protein: np.ndarray  # [n_vars] bool (False also outside the run: see in_run)
    protein_ids: list[str]  # "" without protein (h5ad string columns take no None)
    n_isoforms: np.ndarray  # [n_vars] int32
    uns: dict[str, Any]
    id_column: str
    matched: int  # var rows found in esm_all.pt
    via_alias: int  # of those, found through meta gene_ids / symbols, not the query
    in_run: np.ndarray | None = None  # [n_vars] bool: the var's gene was in the gene list
    not_canonical: tuple[str, ...] = ()  # genes whose canonical isoform was not returned
    flagged: np.ndarray | None = None  # [n_vars] bool: the var's vector is not_canonical's


@dataclass(frozen=True)
class H5adWriteResult:
    """What write_h5ad did, for the CLI's closing lines."""

    out: Path
    n_vars: int
    embedded: int
    id_column: str
    not_canonical: tuple[str, ...] = ()

    def describe(self) -> str:
        line = (f"wrote {self.out}: {self.embedded} of {self.n_vars} vars have an ESM2 vector "
                f"(varm[{ESM_KEY!r}], matched on {self.id_column})")
        if self.not_canonical:  # the words export uses for the same rule
            line += (f"; canonical isoform not returned by Ensembl, first isoform used: "
                     f"{len(self.not_canonical)} ({name_some(self.not_canonical)}), flagged "
                     "in var['esm2_not_canonical']")
        return line


def var_annotations(esm: EsmFile, queries: Sequence[str | None], *,
                    gene_pooling: str = "canonical", id_column: str = "var_names",
                    source: str | None = None) -> VarAnnotations:
    """Pool each var row's gene (by its query) into the arrays write_h5ad stores.

    A query the file does not list is tried once more through the file's own records of
    what each key is (meta["gene_ids"]: query -> ENSG, meta["symbols"]: query -> symbol),
    so an .h5ad keyed by IDs can take vectors from a run made from symbols, and back.
    """
    check_gene_pooling(gene_pooling)
    keys, via_alias = _file_keys(esm, queries)
    vectors = gene_vectors(esm, [k or "" for k in keys], gene_pooling=gene_pooling)
    in_run = np.array([k is not None and f for k, f in zip(keys, vectors.in_file, strict=True)],
                      dtype=bool)
    has = vectors.has_protein.numpy() & in_run
    matrix = vectors.matrix.numpy().astype(np.float32, copy=True)
    matrix[~has] = 0.0
    odd = set(vectors.not_canonical)
    return VarAnnotations(
        matrix=matrix, has_protein=has,
        protein_ids=[p if p and h else "" for p, h in zip(vectors.protein_ids, has,
                                                          strict=True)],
        n_isoforms=np.array([n if k is not None else 0
                             for n, k in zip(vectors.n_isoforms, keys, strict=True)],
                            dtype=np.int32),
        uns=_uns(esm, gene_pooling, id_column, int(has.sum()), source),
        id_column=id_column, matched=sum(k is not None for k in keys), via_alias=via_alias,
        in_run=in_run, not_canonical=vectors.not_canonical,
        flagged=np.array([k in odd for k in keys], dtype=bool) & has)


def _file_keys(esm: EsmFile, queries: Sequence[str | None]) -> tuple[list[str | None], int]:
    """The esm_all.pt key of each query (None: not in the file), and how many by alias."""
    direct = esm.match_rows([q or "" for q in queries])
    aliases = _aliases(esm)
    keys: list[str | None] = []
    via_alias = 0
    for query, rows in zip(queries, direct, strict=True):
        if query is None:
            keys.append(None)
        elif rows is not None:
            keys.append(query)
        else:
            alias = aliases.get(query_key(query)) or aliases.get(query.casefold())
            via_alias += alias is not None
            keys.append(alias)
    return keys, via_alias


def _aliases(esm: EsmFile) -> dict[str, str]:
    """ENSG (ID key) and casefolded symbol -> the file's query, from the file's meta."""
    out: dict[str, str] = {}
    for meta_key, fold in (("gene_ids", query_key), ("symbols", str.casefold)):
        recorded = esm.meta.get(meta_key) or {}
        if isinstance(recorded, Mapping):
            for query, name in recorded.items():
                if name and query in esm.gene_to_isoform_indices:
                    out.setdefault(fold(str(name)), str(query))
    return out


def _uns(esm: EsmFile, gene_pooling: str, id_column: str, embedded: int,
         source: str | None) -> dict[str, Any]:
    """uns["esm2"]: plain strings and numbers only (h5ad stores no None)."""
    meta = esm.meta
    fields = {
        "model": meta.get("model"), "layer": meta.get("layer"),
        "pooling": meta.get("pooling"), "isoform_pooling": gene_pooling,
        "truncation": meta.get("truncation"), "species": meta.get("species"),
        "ensembl_release": meta.get("ensembl_release"),
        "isoform_source": meta.get("isoform_source"), "date": meta.get("created"),
        "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "esm_file": source, "id_column": id_column, "n_embedded": embedded,
        "esm2_batch_version": package_version(),
    }
    return {k: ("unknown" if v is None else v) for k, v in fields.items()}


def annotate_anndata(adata: Any, esm: EsmFile | str | os.PathLike[str], *,
                     gene_pooling: str = "canonical", id_column: str | None = None,
                     queries_for_vars: Sequence[str | None] | None = None) -> VarAnnotations:
    """Add varm["X_esm2"], the var["esm2_*"] columns and uns["esm2"] to an AnnData in place.

    For AnnData objects already in memory (a notebook); files go through write_h5ad,
    which never loads X.
    """
    data = esm if isinstance(esm, EsmFile) else read_esm_file(esm)
    queries, label = _queries_for(adata.var, data, id_column, queries_for_vars, "adata")
    notes = var_annotations(data, queries, gene_pooling=gene_pooling, id_column=label,
                            source=None if isinstance(esm, EsmFile) else str(esm))
    adata.varm[ESM_KEY] = notes.matrix
    for name, values in _var_columns(notes).items():
        adata.var[name] = values
    adata.uns["esm2"] = notes.uns
    return notes


def write_h5ad(src: str | os.PathLike[str], dst: str | os.PathLike[str],
               esm: EsmFile | str | os.PathLike[str], *, gene_pooling: str = "canonical",
               id_column: str | None = None,
               queries_for_vars: Sequence[str | None] | None = None,
               esm_path: str | os.PathLike[str] | None = None) -> H5adWriteResult:
    """Write a copy of `src` to `dst` with the ESM2 vectors of its vars (see module doc).

    Var rows map to esm_all.pt keys by `queries_for_vars` (one per var row) when given,
    else by the rule read_h5ad_genes used, with id_column defaulting to the one recorded
    in the file's meta["id_column"] when this var has it; with `queries_for_vars`,
    `id_column` names the column they came from (uns['esm2'] records it). `esm_path` names
    the file an in-memory `esm` was written to. `dst` is replaced atomically; it may not
    be `src`.
    """
    src_path, dst_path = Path(src), Path(dst)
    check_h5ad_paths(src_path, dst_path)
    data = esm if isinstance(esm, EsmFile) else read_esm_file(esm)
    var = read_var(src_path)
    queries, label = _queries_for(var, data, id_column, queries_for_vars, str(src_path))
    notes = var_annotations(data, queries, gene_pooling=gene_pooling, id_column=label,
                            source=_esm_source(esm, esm_path))
    for name, values in _var_columns(notes).items():
        var[name] = values
    _write_copy(src_path, dst_path, var, notes)
    return H5adWriteResult(dst_path, len(queries), int(notes.has_protein.sum()), label,
                           notes.not_canonical)


def _esm_source(esm: EsmFile | str | os.PathLike[str],
                esm_path: str | os.PathLike[str] | None) -> str | None:
    """The esm_all.pt the vectors came from, for uns['esm2']."""
    if esm_path is not None:
        return str(esm_path)
    return None if isinstance(esm, EsmFile) else str(esm)


def _queries_for(var: Any, esm: EsmFile, id_column: str | None,
                 queries_for_vars: Sequence[str | None] | None, source: str
                 ) -> tuple[list[str | None], str]:
    if queries_for_vars is not None:
        queries = list(queries_for_vars)
        if len(queries) != len(var.index):
            raise InputError(f"{source}: queries_for_vars has {len(queries)} entries for "
                             f"{len(var.index)} vars; pass one query (or None) per var row")
        return queries, id_column or "given"
    recorded = esm.meta.get("id_column")
    if id_column is None and isinstance(recorded, str):
        if recorded in INDEX_NAMES or recorded in var.columns:
            id_column = recorded
        else:
            log.warning("%s: var has no %r column, which the run read its genes from; "
                        "matching vars by the usual rule instead", source, recorded)
    found = var_queries(var, id_column=id_column, source=source)
    return found.queries, found.column


def _var_columns(notes: VarAnnotations) -> dict[str, Any]:
    """The var columns, missing (<NA>) for vars outside the run: a gene that was not in
    the gene list was never looked up, so "has no protein" (False) would be a claim the
    run cannot make. Nullable pandas dtypes, which anndata writes and reads back."""
    import pandas as pd

    outside = ~(notes.in_run if notes.in_run is not None else notes.has_protein)
    flagged = notes.flagged if notes.flagged is not None else np.zeros_like(outside)

    def nullable(values: np.ndarray, dtype: str) -> Any:
        column = pd.array(values, dtype=dtype)
        column[outside] = pd.NA
        return column

    return {"esm2_has_protein": nullable(notes.has_protein, "boolean"),
            "esm2_protein_id": notes.protein_ids,
            "esm2_n_isoforms": nullable(notes.n_isoforms, "Int32"),
            "esm2_not_canonical": nullable(flagged, "boolean")}


def check_h5ad_paths(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Fail before the run, not after it, when the h5ad copy cannot be written."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError(f"{src}: no such .h5ad file; pass an existing file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(f"{dst}: is the input file; --write_h5ad must name a new file (the "
                         "input is never modified)")
    check_writable(dst, flag="--write_h5ad", example="out.h5ad")


def _write_copy(src: Path, dst: Path, var: Any, notes: VarAnnotations) -> None:
    """Copy the file, rewrite var/varm/uns in the copy, publish it atomically."""
    anndata = import_anndata()
    import h5py

    def annotate(copy: Path) -> None:
        with h5py.File(copy, "r+") as handle:
            write = elem_io(anndata)[1]
            write(handle, "var", var)
            _write_into(write, handle, "varm", ESM_KEY, notes.matrix)
            _write_into(write, handle, "uns", "esm2", notes.uns)

    atomic_copy(src, dst, annotate)


def _write_into(write: Any, handle: Any, group: str, key: str, value: Any) -> None:
    """Write one entry into varm/uns, creating the group (as anndata encodes it) if absent."""
    if group in handle:
        write(handle[group], key, value)
    else:
        write(handle, group, {key: value})
