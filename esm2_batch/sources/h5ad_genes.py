"""Genes from an .h5ad: the vars flagged in var["highly_variable"] (scanpy's flag).

Each var's query comes from, in this order:

    1. id_column, when given ("var_names" or "index" means the var index)
    2. var["gene_ids"] (Cell Ranger / scanpy.read_10x_*), or "gene_ids-<n>" after a concat
    3. the var index, when it holds Ensembl gene IDs (CELLxGENE Census / Discover files)
    4. the var index as symbols, with scanpy's var_names_make_unique suffixes removed
       ("TBCE-1" -> "TBCE" only when "TBCE" is itself a var: NKX2-1 stays NKX2-1)

The column used is part of the result, so the CLI can say it, and the same rule maps every
var row (not only the highly variable ones) back to a query when outputs/h5ad.py writes
vectors into a copy. Only var is read (never X). anndata is an optional extra:
`pip install 'esm2-batch[anndata]'`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esm2_batch.errors import InputError, first_line
from esm2_batch.records import is_ensembl_gene_id
from esm2_batch.sources.gene_lists import GeneList, dedupe

__all__ = [
    "INDEX_NAMES",
    "H5adGenes",
    "VarQueries",
    "elem_io",
    "import_anndata",
    "read_h5ad_genes",
    "read_var",
    "var_queries",
    "var_symbols",
]

log = logging.getLogger("esm2_batch")

HVG_COLUMN = "highly_variable"
INDEX_NAMES = ("var_names", "index")
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_gene_id")
_SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "gene_name", "symbol")
_ID_SHARE = 0.9  # share of Ensembl-looking names that makes a column or index "IDs"
_INSTALL_HINT = "pip install 'esm2-batch[anndata]'"


@dataclass(frozen=True)
class H5adGenes:
    """The genes of an .h5ad and how each var row maps to a query.

    `genes` are the highly variable vars' queries, in var order, deduplicated: the list the
    pipeline fetches and the keys of esm_all.pt. `var_queries[i]` is var row i's query
    (None when its id cell is empty), for every var, so a writer can put vectors back.
    """

    path: Path
    genes: GeneList
    id_column: str  # "gene_ids", "var_names", or the column the caller named
    id_kind: str  # "ensembl_ids" or "symbols"
    hvg_column: str | None
    var_names: tuple[str, ...]
    var_queries: tuple[str | None, ...]
    hvg_mask: tuple[bool, ...]
    stripped: tuple[tuple[str, str], ...] = field(default=())  # (var name, query)
    var_symbols: tuple[str | None, ...] = field(default=())  # the file's own symbol per var

    @property
    def n_vars(self) -> int:
        return len(self.var_names)

    @property
    def n_hvg(self) -> int:
        return sum(self.hvg_mask)

    def describe(self) -> str:
        """One line for the CLI: which vars, which column, what was cleaned."""
        where = "var_names" if self.id_column in INDEX_NAMES else f"var[{self.id_column!r}]"
        kind = "Ensembl gene IDs" if self.id_kind == "ensembl_ids" else "gene symbols"
        chosen = (f"{self.n_hvg} highly variable of {self.n_vars} vars "
                  f"(var[{self.hvg_column!r}])" if self.hvg_column else f"all {self.n_vars} vars")
        note = (f"; removed make_unique suffixes from {len(self.stripped)} names "
                f"(e.g. {self.stripped[0][0]} -> {self.stripped[0][1]})" if self.stripped else "")
        return f"{self.path}: {chosen}; queries are {kind} from {where}{note}"

    def symbol_map(self) -> dict[str, str]:
        """{query: symbol} for queries that are not their own symbol (Ensembl IDs), with the
        symbol the file itself uses (10x var names, CELLxGENE feature_name): the keys a
        per-gene export for SATURN or UCE must match against this file's var_names."""
        out: dict[str, str] = {}
        for query, symbol in zip(self.var_queries, self.var_symbols, strict=False):
            if query is not None and symbol and symbol != query:
                out.setdefault(query, symbol)
        return out


def read_h5ad_genes(path: str | os.PathLike[str], *, id_column: str | None = None,
                    hvg_column: str | None = HVG_COLUMN) -> H5adGenes:
    """Read an .h5ad's var (never X) and return its highly variable genes as queries.

    hvg_column=None takes every var. Raises InputError, naming the file and the fix, when
    anndata is missing, the file is unreadable, the flag column or id_column is absent,
    or no gene is flagged.
    """
    path = Path(path)
    var = read_var(path)
    found = var_queries(var, id_column=id_column, source=str(path))
    mask = _hvg_mask(var, hvg_column, path)
    genes = dedupe(q for q, m in zip(found.queries, mask, strict=True) if m and q is not None)
    if not genes.genes:
        raise InputError(f"{path}: no gene is flagged in var[{hvg_column!r}] (or their "
                         f"{found.column} cells are empty); flag some, or pass a gene list "
                         "file")
    return H5adGenes(path=path, genes=genes, id_column=found.column, id_kind=found.kind,
                     hvg_column=hvg_column, var_names=tuple(str(n) for n in var.index),
                     var_queries=tuple(found.queries), hvg_mask=tuple(mask),
                     stripped=found.stripped,
                     var_symbols=tuple(var_symbols(var, found.queries, found.kind)))


def var_symbols(var: Any, queries: Sequence[str | None], kind: str) -> list[str | None]:
    """The symbol each var row goes by in this file: the query when the queries are
    symbols; else the var names when they are symbols (10x); else a symbol column
    (CELLxGENE's feature_name, ...); None when the file has none."""
    if kind == "symbols":
        return list(queries)
    names = [str(n) for n in var.index]
    if not _mostly_ids(names):
        return [n or None for n in _strip_make_unique(names)[0]]
    for column in _SYMBOL_COLUMNS:
        if column in var.columns:
            return [c or None for c in _cells(var[column])]
    return [None] * len(names)


@dataclass(frozen=True)
class VarQueries:
    """Each var row's query and where the queries came from."""

    queries: list[str | None]  # one per var row; None for an empty id cell
    column: str  # the var column used, or "var_names"
    kind: str  # "ensembl_ids" or "symbols"
    stripped: tuple[tuple[str, str], ...] = ()  # (var name, query): make_unique undone


def var_queries(var: Any, *, id_column: str | None = None, source: str = "var"
                ) -> VarQueries:
    """Each var row's query, by the rule of the module docstring.

    `var` is the AnnData's var DataFrame. One function, so that reading the genes and
    writing the vectors can never disagree about which var is which gene.
    """
    names = [str(n) for n in var.index]
    if id_column is not None and id_column not in INDEX_NAMES:
        if id_column not in var.columns:
            raise InputError(f"{source}: var has no column {id_column!r}; columns are "
                             f"{list(map(str, var.columns))} (or use var_names)")
        return _column_queries(var, id_column)
    if id_column is None:
        column = _id_column(var)
        if column is not None:
            return _column_queries(var, column)
    if _mostly_ids(names):
        return VarQueries([n.strip() or None for n in names], "var_names", "ensembl_ids")
    stripped_names, stripped = _strip_make_unique(names)
    return VarQueries([n.strip() or None for n in stripped_names], "var_names", "symbols",
                      stripped)


def _id_column(var: Any) -> str | None:
    """gene_ids (10x) as is; other ID-ish columns only when they hold Ensembl IDs."""
    columns = [str(c) for c in var.columns]
    if "gene_ids" in columns:
        return "gene_ids"
    concat = sorted(c for c in columns if c.startswith("gene_ids-"))
    if concat:
        return concat[0]
    for column in _ID_COLUMNS[1:]:
        if column in columns and _mostly_ids(_cells(var[column])):
            return column
    return None


def _column_queries(var: Any, column: str) -> VarQueries:
    cells = _cells(var[column])
    kind = "ensembl_ids" if _mostly_ids([c for c in cells if c]) else "symbols"
    return VarQueries([c or None for c in cells], column, kind)


def _cells(series: Any) -> list[str]:
    """A column as stripped strings; missing values (NaN, None, pd.NA) become ""."""
    import pandas as pd

    return ["" if pd.isna(v) else str(v).strip() for v in series.tolist()]


def _mostly_ids(names: Sequence[str]) -> bool:
    present = [n for n in names if n]
    hits = sum(is_ensembl_gene_id(n) for n in present)
    return bool(present) and hits >= _ID_SHARE * len(present)


def _strip_make_unique(names: list[str]) -> tuple[list[str], tuple[tuple[str, str], ...]]:
    """Undo var_names_make_unique: "X-<n>" -> "X" only when "X" is itself a var name.

    make_unique appends -1, -2, ... to the second and later copies of a name; requiring
    the bare name keeps real symbols that end in -<digit> (NKX2-1, HLA-DRB1 has none).
    """
    present = set(names)
    out: list[str] = []
    stripped: list[tuple[str, str]] = []
    for name in names:
        base, sep, suffix = name.rpartition("-")
        if sep and base and suffix.isdigit() and base in present:
            out.append(base)
            stripped.append((name, base))
        else:
            out.append(name)
    return out, tuple(stripped)


def _hvg_mask(var: Any, hvg_column: str | None, path: Path) -> list[bool]:
    if hvg_column is None:
        return [True] * len(var.index)
    if hvg_column not in var.columns:
        raise InputError(f"{path}: var has no {hvg_column!r} column; run "
                         f"scanpy.pp.highly_variable_genes(adata, n_top_genes=2000) and save "
                         "the file, or pass the genes as a text list to --hvg_file")
    values = var[hvg_column].tolist()
    try:
        return [_flag(v) for v in values]
    except ValueError as exc:
        raise InputError(f"{path}: var[{hvg_column!r}] holds {exc}; it must be True/False "
                         "per gene") from None


def _flag(value: Any) -> bool:
    """bool, 0/1, "True"/"False" (a column that went through CSV); missing means False."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "", "nan"):
        return False
    raise ValueError(repr(value))


def import_anndata() -> Any:
    """Import anndata lazily: it is an optional extra, and a heavy import."""
    try:
        import anndata
    except ImportError as exc:
        raise InputError(f"reading and writing .h5ad files needs anndata: {_INSTALL_HINT}"
                         ) from exc
    return anndata


def elem_io(anndata: Any) -> tuple[Any, Any]:
    """(read_elem, write_elem): anndata.io from 0.11, anndata.experimental before."""
    module = getattr(anndata, "io", None)
    if module is None or not hasattr(module, "write_elem"):
        module = anndata.experimental
    return module.read_elem, module.write_elem


def read_var(path: Path) -> Any:
    """var only (never X or obs), as a DataFrame; older layouts via a backed open."""
    anndata = import_anndata()
    if not path.is_file():
        raise InputError(f"{path}: no such .h5ad file; pass an existing file to --hvg_file")
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return elem_io(anndata)[0](handle["var"])
    except (OSError, KeyError) as exc:
        raise InputError(f"{path}: not a readable .h5ad file ({first_line(exc)}); write it with "
                         "adata.write_h5ad()") from exc
    except Exception:  # a pre-0.7 layout that the element reader does not know
        return _read_var_backed(anndata, path)


def _read_var_backed(anndata: Any, path: Path) -> Any:
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as exc:
        raise InputError(f"{path}: not a readable .h5ad file ({first_line(exc)})") from exc
    try:
        return adata.var.copy()
    finally:
        adata.file.close()
