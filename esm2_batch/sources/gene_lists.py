"""Read gene lists and tell Ensembl gene IDs from symbols.

A gene list is what a single-cell study hands over: a text file with one gene per line
(blank lines, '#' comments, a UTF-8 BOM and CRLF line ends tolerated) or a CSV/TSV table
with a gene column. Queries keep the user's spelling, because that spelling is the key of
the output file; only deduplication looks through version suffixes.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from esm2_batch.errors import InputError, first_line
from esm2_batch.records import query_key, strip_version

_GENE_COLUMNS = ("gene_id", "gene_ids", "ensembl_id", "gene", "gene_symbol", "symbol",
                 "gene_name", "feature")


@dataclass(frozen=True, slots=True)
class GeneList:
    """The distinct queries in input order, and those dropped as repeats."""

    genes: tuple[str, ...]
    duplicates: tuple[str, ...]


def dedupe(queries: Iterable[str]) -> GeneList:
    """Keep the first spelling of each gene, in order; report the repeats."""
    seen: set[str] = set()
    genes: list[str] = []
    duplicates: list[str] = []
    for raw in queries:
        query = raw.strip()
        if not query:
            continue
        key = query_key(query)
        if key in seen:
            duplicates.append(query)
        else:
            seen.add(key)
            genes.append(query)
    return GeneList(tuple(genes), tuple(duplicates))


def merge_spellings(queries: Sequence[str], gene_id_of: Callable[[str], str | None]
                    ) -> tuple[list[str], dict[str, str]]:
    """Queries that resolved to one Ensembl gene are one gene: the first spelling is kept
    (it is the file's key) and the later ones map to it as aliases. BRAF, braf and
    ENSG00000157764 in one list would otherwise give three copies of BRAF's rows; queries
    that resolved to nothing are never merged."""
    first: dict[str, str] = {}
    kept: list[str] = []
    aliases: dict[str, str] = {}
    for query in queries:
        gene_id = gene_id_of(query)
        key = strip_version(gene_id).upper() if gene_id else None
        if key is not None and key in first:
            aliases[query] = first[key]
            continue
        if key is not None:
            first[key] = query
        kept.append(query)
    return kept, aliases


def read_gene_list(path: str | Path, *, column: str | None = None) -> GeneList:
    """Read a .txt (one per line) or .csv/.tsv (a gene column) list of genes.

    Raises InputError, naming the file, when it is missing, unreadable or holds no gene.
    """
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        queries = _table_column(text, "," if suffix == ".csv" else "\t", column, path)
    else:
        queries = _text_lines(text)
    genes = dedupe(queries)
    if not genes.genes:
        raise InputError(f"{path}: the gene list is empty; put one gene symbol or "
                         "Ensembl gene ID per line")
    return genes


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a gene list; pass the file inside "
                         "it to --hvg_file")
    if not path.is_file():
        raise InputError(f"{path}: no such gene list file; pass an existing file to "
                         "--hvg_file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the gene list ({first_line(exc)}); save it as "
                         "UTF-8 text") from exc
    if "\0" in text or any(not c.isprintable() and not c.isspace() for c in text):
        raise InputError(f"{path}: holds binary data, not a gene list; pass a text file "
                         "with one gene symbol or Ensembl gene ID per line")
    return text


def _text_lines(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def _table_column(text: str, delimiter: str, column: str | None, path: Path) -> list[str]:
    rows = [row for row in csv.reader(text.splitlines(), delimiter=delimiter) if row]
    if not rows:
        return []
    header = [cell.strip() for cell in rows[0]]
    lowered = [cell.lower() for cell in header]
    if column is not None:
        if column not in header:
            raise InputError(f"{path}: no column {column!r}; columns are {header}")
        index = header.index(column)
    else:
        index = next((lowered.index(c) for c in _GENE_COLUMNS if c in lowered), 0)
    return [row[index].strip() for row in rows[1:] if len(row) > index]
