"""Read gene lists and tell Ensembl gene IDs from symbols.

A gene list is what a single-cell study hands over: a text file with one gene per line
(blank lines, '#' comments, a UTF-8 BOM and CRLF line ends tolerated) or a CSV/TSV table
with a gene column. Queries keep the user's spelling, because that spelling is the key of
the output file; only deduplication looks through version suffixes.

What is not a gene list is refused in one line rather than sent to Ensembl as "genes": a
FASTA (a '>' header, or a line that can only be a protein sequence). A table's gene
column is the one whose VALUES are gene symbols or Ensembl IDs (the known layouts' names
break ties: scanpy's `names`, Seurat's `gene` or row names, `gene_ids`, `feature_name`,
...), never a cluster or score column because it comes first; the column used is said on
the INPUTS_LOGGER logger, which the CLI shows even under -q.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from esm2_batch.errors import InputError, first_line, name_some
from esm2_batch.records import (
    GeneIsoforms,
    is_ensembl_gene_id,
    is_spreadsheet_date,
    query_key,
    strip_version,
)

INPUTS_LOGGER = "esm2_batch.inputs"
"""Lines about what was read from the user's input (which table column held the genes):
the CLI shows this logger's INFO lines on stderr even under -q."""
log = logging.getLogger(INPUTS_LOGGER)

# Known layouts, most specific first (IDs before symbols, as for .h5ad; a named gene
# column before R's row names, which FindAllMarkers makes unique as PPBP.1): a tie-break
# among the columns whose values look like genes, never a reason to take one that does not.
_GENE_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_gene_id", "gene", "genes",
                 "names", "gene_symbols", "gene_symbol", "symbol", "gene_name",
                 "feature_name", "gene_short_name", "features", "feature", "")
_ROW_NAME_SPELLINGS = ("", "rownames", "row.names", "row_names", "index")
_GENE_SHARE = 0.8  # share of a column's non-empty cells that must look like genes
_SYMBOL = re.compile(r"[A-Za-z][A-Za-z0-9._\-]{0,39}")
_NOT_A_SYMBOL = frozenset({"na", "nan", "null", "none", "true", "false", "inf"})
# 20+ amino-acid letters and nothing else: a protein sequence, no gene symbol (the
# longest letters-only symbols of the 2,000 PBMC HVGs have 7; CD, ACE, MYC are genes)
_SEQUENCE = re.compile(r"[ACDEFGHIKLMNPQRSTVWYBXZUO*]{20,}", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class GeneList:
    """The distinct queries in input order, and those dropped as repeats; `column` is
    the table column they came from ("" for R's row names; None for one gene per line)."""

    genes: tuple[str, ...]
    duplicates: tuple[str, ...]
    column: str | None = None


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


def as_duplicates(genes: Sequence[GeneIsoforms]) -> list[GeneIsoforms]:
    """`genes` with merge_spellings' rule applied to the records themselves: a later
    spelling of a gene (ppbp after PPBP, a symbol after its own ENSG) becomes a
    duplicate of the first, in the form a synonym's duplicate has (records.py): not found,
    `duplicate_of` the first spelling, the gene named in `candidates`, so it never stands
    in for the first spelling's isoforms. fetch_isoforms returns this; the CLI applies
    merge_spellings when it assembles esm_all.pt: one rule for both."""
    by_query = {g.query: g for g in genes}
    _, aliases = merge_spellings([g.query for g in genes],
                                 lambda q: by_query[q].gene_id)
    return [g if g.query not in aliases else GeneIsoforms(
        g.query, None, None, (), "not_found", matched_by=g.matched_by,
        candidates=((strip_version(g.gene_id or ""), g.symbol or ""),),
        duplicate_of=aliases[g.query]) for g in genes]


def read_gene_list(path: str | Path, *, column: str | None = None) -> GeneList:
    """Read a .txt (one per line) or .csv/.tsv (a gene column) list of genes.

    `column` names a table's gene column (any case; "" or "rownames" for R's unnamed
    row-name column); without it the column whose values look like genes is chosen.
    Raises InputError, naming the file, when it is missing, unreadable, a FASTA, a table
    without a gene column, or holds no gene.
    """
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        column, queries = _table_column(text, "," if suffix == ".csv" else "\t", column, path)
    elif column is not None:
        raise InputError(f"{path}: a list of one gene per line has no columns; --gene_column "
                         "is for CSV/TSV tables (.csv, .tsv) and .h5ad files")
    else:
        queries = _text_lines(text, path)
    genes = dedupe(queries)
    if not genes.genes:
        raise InputError(f"{path}: the gene list is empty; put one gene symbol or "
                         "Ensembl gene ID per line")
    return GeneList(genes.genes, genes.duplicates, column)


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


def _text_lines(text: str, path: Path) -> list[str]:
    lines: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        _refuse_fasta(raw.strip(), number, path)
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _refuse_fasta(line: str, number: int, path: Path) -> None:
    """A FASTA given as a gene list: its headers and sequence lines would go to Ensembl
    as "genes" and come back as kilobytes of "not found". One line, pointing at the
    command that embeds sequences."""
    if line.startswith(">"):
        why = f"line {number} is a FASTA header"
    elif _SEQUENCE.fullmatch(line):
        why = f"line {number} is a protein sequence of {len(line)} letters"
    else:
        return
    raise InputError(f"{path}: {why}, not a gene symbol or ID; embed the sequences of a "
                     f"FASTA with `esm2-batch fasta {path}`, or give --hvg_file one gene "
                     "per line")


def looks_like_gene(value: str) -> bool:
    """An Ensembl gene ID or something shaped like a gene symbol: not a number, a
    p-value, NA, a cluster label such as "0", a label with spaces or a sequence."""
    if is_ensembl_gene_id(value) or is_spreadsheet_date(value):
        return True
    return (bool(_SYMBOL.fullmatch(value)) and value.casefold() not in _NOT_A_SYMBOL
            and not _SEQUENCE.fullmatch(value))


@dataclass(frozen=True)
class _Column:
    name: str  # "" for R's row names
    values: list[str]

    @property
    def shown(self) -> str:
        return self.name or "(row names)"

    @property
    def filled(self) -> list[str]:
        return [v for v in self.values if v]

    @property
    def gene_share(self) -> float:
        filled = self.filled
        return sum(map(looks_like_gene, filled)) / len(filled) if filled else 0.0


def _table_column(text: str, delimiter: str, column: str | None, path: Path
                  ) -> tuple[str | None, list[str]]:
    """(the gene column's name, its values): the named one, else the one holding genes."""
    columns = _columns(text, delimiter)
    if not columns:
        return None, []
    chosen = _named(columns, column, path) if column is not None else _guess(columns, path)
    count = len(chosen.filled)
    where = f"column {chosen.name!r}" if chosen.name else "the row names, the unnamed first column"
    log.info("%s: genes from %s (%s rows)", path, where, f"{count:,}")
    return chosen.name, chosen.values


def _columns(text: str, delimiter: str) -> list[_Column]:
    rows = [row for row in csv.reader(text.splitlines(), delimiter=delimiter) if row]
    if len(rows) < 2:  # no table, or a header alone: an empty list, said as such
        return []
    header = [cell.strip() for cell in rows[0]]
    data = rows[1:]
    if data and all(len(row) == len(header) + 1 for row in data):
        header = ["", *header]  # R's write.table: no header cell above the row names
    return [_Column(name, [row[i].strip() if len(row) > i else "" for row in data])
            for i, name in enumerate(header)]


def _named(columns: list[_Column], column: str, path: Path) -> _Column:
    for match in (lambda c: c.name == column,
                  lambda c: c.name.casefold() == column.casefold(),
                  lambda c: not c.name and column.casefold() in _ROW_NAME_SPELLINGS):
        found = [c for c in columns if match(c)]
        if found:
            return found[0]
    raise InputError(f"{path}: no column {column!r}; columns are "
                     f"{name_some([c.shown for c in columns], 12)}; pass one of them to "
                     "--gene_column")


def _guess(columns: list[_Column], path: Path) -> _Column:
    """The column whose values look like genes; of several, the known layout's name
    (_GENE_COLUMNS order), else the one with the most distinct values (a marker table's
    genes outnumber its clusters)."""
    genes = [c for c in columns if c.gene_share >= _GENE_SHARE]
    known = [c for c in genes if c.name.casefold() in _GENE_COLUMNS]
    if known:
        return min(known, key=lambda c: _GENE_COLUMNS.index(c.name.casefold()))
    if genes:
        return max(genes, key=lambda c: len(set(c.filled)))  # leftmost of equals
    raise InputError(f"{path}: no column holds gene symbols or Ensembl gene IDs (columns: "
                     f"{name_some([c.shown for c in columns], 12)}); name the gene column "
                     "with --gene_column COL")
