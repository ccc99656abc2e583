"""Gene names that are not the current symbol: previous names and aliases.

Single-cell gene lists carry the names of the reference they were aligned to (SEPT5,
KIAA0101, H2AFZ), which HGNC and MGI have renamed since (SEPTIN5, PCLAF, H2AZ1). Ensembl
REST's lookup/symbol matches current display names only; what misses is looked up once
more by synonym, online through GET /xrefs/symbol (ensembl_rest/client.py) and offline
through HGNC's complete set table read here (ensembl_files.py). Both decide with the one
rule in `choose`:

    the current genes the synonym names, on the primary assembly (CHR_* patches and
    haplotypes repeat a gene under other IDs)
        one      resolved: fetched like any other gene, keyed by the user's query
        several  the one with a protein of the wanted biotypes if exactly one has it,
                 else ambiguous: reported with the candidates, never guessed
        none     not found, as before

A gene found this way that the list already asks for (by ID, by its current symbol, or
through an earlier synonym) is a duplicate of that query, not fetched twice
(`DuplicateGuard`). Names that cannot be a synonym (a spreadsheet date such as 7-Sep, a
clone name such as RP11-34P13.3) are not looked up (`worth_a_lookup`).

HGNC's complete set (hgnc_complete_set.txt, tab-separated, with a header) is read by its
columns symbol, prev_symbol, alias_symbol (pipe-separated, possibly quoted) and
ensembl_gene_id. MGI's files keep synonyms and Ensembl IDs in two reports; a table in the
same four columns works for mouse or any species.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from esm2_batch.errors import InputError
from esm2_batch.records import (
    is_clone_name,
    is_ensembl_gene_id,
    is_spreadsheet_date,
    query_key,
    strip_version,
)
from esm2_batch.sources.fasta import open_text

__all__ = [
    "HGNC_COMPLETE_SET_URL",
    "Candidate",
    "DuplicateGuard",
    "SynonymTable",
    "choose",
    "is_primary_region",
    "synonym_db",
    "synonym_file_url",
    "worth_a_lookup",
]

HGNC_COMPLETE_SET_URL = ("https://storage.googleapis.com/public-download-files/hgnc/tsv/tsv/"
                         "hgnc_complete_set.txt")
# The Ensembl external_db whose synonyms count (GET /xrefs/symbol?external_db=...).
_SYNONYM_DB = {"homo_sapiens": "HGNC", "mus_musculus": "MGI"}


def synonym_db(species: str) -> str | None:
    """HGNC for human, MGI for mouse, None (every external database) otherwise."""
    return _SYNONYM_DB.get(species.strip().lower())


def synonym_file_url(species: str) -> str | None:
    """Where `esm2-batch download` fetches the synonym table of a species (human only)."""
    return HGNC_COMPLETE_SET_URL if species.strip().lower() == "homo_sapiens" else None


def worth_a_lookup(query: str) -> bool:
    """False for names no synonym table holds: Ensembl IDs, spreadsheet dates (7-Sep:
    reported as such), clone and accession names (RP11-34P13.3, AC012345.1)."""
    query = query.strip()
    return bool(query) and not (is_ensembl_gene_id(query) or is_spreadsheet_date(query)
                                or is_clone_name(query))


def is_primary_region(region: str | None) -> bool:
    """A gene's seq_region on the primary assembly (chromosomes, unplaced scaffolds), not
    a CHR_* patch or alternative haplotype; unknown counts as primary."""
    return not (region or "").upper().startswith("CHR_")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A current gene a synonym names."""

    gene_id: str
    symbol: str | None
    primary: bool
    coding: bool


def choose(candidates: Iterable[Candidate]) -> Candidate | list[Candidate] | None:
    """The gene a synonym resolves to, the candidates when ambiguous, or None."""
    unique = {c.gene_id.upper(): c for c in candidates}
    primary = sorted((c for c in unique.values() if c.primary), key=lambda c: c.gene_id)
    if len(primary) <= 1:
        return primary[0] if primary else None
    coding = [c for c in primary if c.coding]
    return coding[0] if len(coding) == 1 else primary


@dataclass
class DuplicateGuard:
    """Which query of the list already asks for a gene, so a synonym naming it is a
    duplicate rather than a second fetch. Built from the whole list before fetching."""

    ids: dict[str, str] = field(default_factory=dict)      # ENSG (upper) -> query
    symbols: dict[str, str] = field(default_factory=dict)  # casefolded symbol -> query

    @classmethod
    def of(cls, queries: Iterable[str]) -> DuplicateGuard:
        guard = cls()
        for query in queries:
            if is_ensembl_gene_id(query):
                guard.ids.setdefault(query_key(query), query)
            else:
                guard.symbols.setdefault(query.casefold(), query)
        return guard

    def claim(self, query: str, gene_id: str, symbol: str | None) -> str | None:
        """The other query that already names this gene, else None (and the gene is now
        `query`'s: a later synonym of the same gene is a duplicate of it)."""
        key = strip_version(gene_id).upper()
        other = self.ids.get(key) or (self.symbols.get(symbol.casefold()) if symbol else None)
        if other is not None and other != query:
            return other
        self.ids.setdefault(key, query)
        return None


class SynonymTable:
    """Symbol, previous symbols and aliases -> Ensembl gene IDs, from HGNC's complete set
    (or any table with the columns symbol, prev_symbol, alias_symbol, ensembl_gene_id)."""

    COLUMNS = ("symbol", "prev_symbol", "alias_symbol", "ensembl_gene_id")

    def __init__(self, rows: Iterable[tuple[str, Sequence[str], str]],
                 path: Path | None = None) -> None:
        """rows: (current symbol, its previous names and aliases, Ensembl gene ID)."""
        self.path = path
        self._names: dict[str, set[str]] = {}
        self._folded: dict[str, set[str]] = {}
        self.symbols: dict[str, str] = {}  # ENSG -> current symbol
        for symbol, synonyms, gene_id in rows:
            if not gene_id:
                continue
            gene_id = strip_version(gene_id).upper()
            self.symbols.setdefault(gene_id, symbol)
            for name in (symbol, *synonyms):
                if name:
                    self._names.setdefault(name, set()).add(gene_id)
                    self._folded.setdefault(name.casefold(), set()).add(gene_id)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> SynonymTable:
        """Read the TSV; InputError naming the file when it is not such a table."""
        path = Path(path)
        try:
            with open_text(path) as handle:
                reader = csv.DictReader(handle, delimiter="\t")
                missing = [c for c in cls.COLUMNS if c not in (reader.fieldnames or ())]
                if missing:
                    raise InputError(f"{path}: no {', '.join(missing)} column; give HGNC's "
                                     f"complete set ({HGNC_COMPLETE_SET_URL}) to --synonyms")
                rows = [(row["symbol"].strip(),
                         _names(row["prev_symbol"]) + _names(row["alias_symbol"]),
                         row["ensembl_gene_id"].strip()) for row in reader]
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a readable synonym table ({exc})") from exc
        return cls(rows, path)

    def gene_ids(self, name: str) -> set[str]:
        """Every Ensembl gene ID the name is a symbol, previous symbol or alias of (exact
        spelling first, else ignoring case, as Ensembl's xrefs lookup does)."""
        return set(self._names.get(name) or self._folded.get(name.casefold()) or ())


def _names(cell: str | None) -> list[str]:
    """'"SEPT5|PNUTL1"' -> ['SEPT5', 'PNUTL1'] (HGNC quotes multi-valued cells)."""
    return [n.strip() for n in (cell or "").strip().strip('"').split("|") if n.strip()]
