"""What a run reports: the summary, and the side files written next to esm_all.pt.

    esm_all.not_found.txt    queries no source knew, one per line
    esm_all.unresolved.tsv   every query without a vector, with its likely reason
    esm_all.failed.tsv       protein ID and error of sequences that could not be embedded
    --save_isoforms FILE     the isoforms used, as FASTA

A side file with nothing to say is removed, so its presence alone means "look here".

Why a query did not resolve: `write_unresolved_report` writes one TSV row per unresolved
query next to the output, with the likely reason that sources/unresolved.py reads from the
query's shape (a spreadsheet date, a clone name, the other species' case, ...):

    query  status  gene_id  symbol  likely_reason

An "incomplete" gene (Ensembl announced translations but returned no sequence for some,
even when asked twice) is listed too, with what is missing, since its rows are fewer than
its isoforms and its first row may not be the canonical isoform.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from esm2_batch.errors import EnsemblError, name_some
from esm2_batch.records import GeneIsoforms, GeneStatus, is_ensembl_gene_id
from esm2_batch.sources.unresolved import RETRY, likely_reason
from esm2_batch.store.atomic import atomic_text
from esm2_batch.store.esm_file import EsmFile

__all__ = [
    "REPORT_COLUMNS",
    "RunSummary",
    "case_insensitive_matches",
    "incomplete_reason",
    "synonym_matches",
    "synonym_note",
    "unresolved_report_path",
    "unresolved_rows",
    "write_side_files",
    "write_unresolved_report",
]

REPORT_COLUMNS = ("query", "status", "gene_id", "symbol", "likely_reason")

# ------------------------------------------------------------------------- the report


def unresolved_report_path(out: str | os.PathLike[str]) -> Path:
    """esm_all.pt -> esm_all.unresolved.tsv, next to the output."""
    out = Path(out)
    return out.with_name(out.stem + ".unresolved.tsv")


def incomplete_reason(missing: Sequence[str], *, rows: int, canonical_missing: bool,
                      failed: Collection[str] = ()) -> str:
    """What an incomplete gene lacks, e.g. "2 of 5 protein sequences not returned by
    Ensembl (ENSP1, ENSP2, canonical missing); rerun the same command to retry".

    `rows` is how many isoforms the gene kept; `failed` names proteins that did arrive
    but failed to embed (listed in the .failed.tsv file, not Ensembl's doing).
    """
    total = rows + len(missing)
    lost = [p for p in missing if p not in failed]
    broken = [p for p in missing if p in failed]
    canonical = ", canonical missing" if canonical_missing else ""
    parts = []
    if lost:
        parts.append(f"{len(lost)} of {total} protein sequences not returned by Ensembl "
                     f"({name_some(lost)}{canonical}); {RETRY}")
    if broken:
        parts.append(f"{len(broken)} of {total} protein sequences failed to embed "
                     f"({name_some(broken)}{'' if lost else canonical}; see the "
                     ".failed.tsv file)")
    return "; ".join(parts)


def unresolved_rows(genes: Iterable[GeneIsoforms], *, species: str | None = None,
                    rows: Mapping[str, int] | None = None, failed: Collection[str] = ()
                    ) -> list[tuple[str, str, str, str, str]]:
    """One row per query that is not "ok", in input order.

    `rows` (query -> rows in the file) counts an incomplete gene's kept isoforms when its
    record does not hold them (a gene reused from an earlier file); `failed` as in
    incomplete_reason.
    """
    return [(g.query, g.status, g.gene_id or "", g.symbol or "",
             _reason(g, species, rows or {}, failed))
            for g in genes if g.status != "ok"]


def _reason(gene: GeneIsoforms, species: str | None, rows: Mapping[str, int],
            failed: Collection[str]) -> str:
    if gene.duplicate_of or gene.candidates:
        return synonym_reason(gene)
    if gene.status != "incomplete":
        return likely_reason(gene.query, gene.status, species=species)
    return incomplete_reason(gene.missing_protein_ids,
                             rows=rows.get(gene.query, len(gene.isoforms)),
                             canonical_missing=gene.canonical_missing, failed=failed)


def write_unresolved_report(path: str | os.PathLike[str], genes: Iterable[GeneIsoforms], *,
                            species: str | None = None, rows: Mapping[str, int] | None = None,
                            failed: Collection[str] = ()) -> Path | None:
    """Write the TSV (header + one row per unresolved query); return its path.

    With nothing unresolved, a stale report from an earlier run is removed and None is
    returned, so the file's presence alone says something needs a look.
    """
    path = Path(path)
    found = unresolved_rows(genes, species=species, rows=rows, failed=failed)
    if not found:
        path.unlink(missing_ok=True)
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(REPORT_COLUMNS)
    writer.writerows(found)
    atomic_text(path, buffer.getvalue())
    return path


def case_insensitive_matches(genes: Iterable[GeneIsoforms]) -> list[tuple[str, str]]:
    """(query, symbol) where a symbol query resolved to a gene spelt in another case."""
    return [(g.query, g.symbol) for g in genes
            if g.symbol and g.status != "not_found" and not is_ensembl_gene_id(g.query)
            and g.query != g.symbol and g.query.casefold() == g.symbol.casefold()]


# -- synonyms (outdated symbols found under their current name) ------------------------------
def synonym_reason(gene: GeneIsoforms) -> str:
    """Why a symbol found by synonym has no vector of its own: ambiguous or a duplicate."""
    if gene.duplicate_of:
        gene_id, symbol = gene.candidates[0] if gene.candidates else ("", "")
        return (f"an earlier name of {symbol or gene_id} ({gene_id}), which the list "
                f"already has as {gene.duplicate_of}: kept once")
    named = ", ".join(f"{g} ({s})" if s else g for g, s in gene.candidates)
    return f"ambiguous: an earlier name or alias of {len(gene.candidates)} genes: {named}"


def synonym_matches(genes: Iterable[GeneIsoforms]) -> list[tuple[str, str]]:
    """(query, current symbol) of the queries found under a newer name, in order."""
    return [(g.query, g.symbol or g.gene_id or "") for g in genes
            if g.matched_by == "synonym" and not g.duplicate_of]


def synonym_note(genes: Iterable[GeneIsoforms]) -> str | None:
    """"found under a newer name: 3 (SEPT5 -> SEPTIN5, ...)", or None when none was."""
    pairs = synonym_matches(genes)
    if not pairs:
        return None
    shown = ", ".join(f"{q} -> {s}" for q, s in pairs[:5])
    return (f"found under a newer name: {len(pairs)} ({shown}{', ...' if len(pairs) > 5 else ''}"
            "); --no_synonyms for strict matching")


# -- the run summary -------------------------------------------------------------------------
class StageCounts(Protocol):
    """What the summary reads from an embedding stage (run/stages.py)."""

    failed: dict[str, tuple[str, str]]
    embedded: int
    cached: int
    tokens: int
    busy_s: float


@dataclass
class RunSummary:
    """What a run did, for the closing report and for callers."""

    out: Path
    genes_in: int = 0
    duplicates: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # later spelling -> the file's key
    resolved: int = 0
    no_protein: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    canonical_missing: list[str] = field(default_factory=list)
    isoforms: int = 0
    distinct_sequences: int = 0
    embedded_now: int = 0
    cached_rows: int = 0  # taken from the shared row cache (store/cache.py)
    reused_rows: int = 0
    tokens: int = 0
    failed: list[str] = field(default_factory=list)
    missing_sequences: list[str] = field(default_factory=list)
    fetch_s: float = 0.0
    embed_s: float = 0.0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.embed_s if self.embed_s > 0 else 0.0

    @property
    def not_found_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".not_found.txt")

    def lines(self) -> list[str]:
        return [
            *self.notes,
            f"genes in: {self.genes_in} ({len(self.duplicates)} duplicates dropped)",
            *self._alias_lines(),
            f"resolved: {self.resolved}, without protein: {len(self.no_protein)}, "
            f"not found: {len(self.not_found)}",
            *self._incomplete_lines(),
            f"isoforms: {self.isoforms}, distinct sequences: {self.distinct_sequences} "
            f"({self.embedded_now} embedded now, {self.cached_rows} from the row cache, "
            f"{self.reused_rows} rows reused)",
            f"tokens embedded: {self.tokens}, failed sequences: {len(self.failed)}",
            f"wall: fetch {self.fetch_s:.1f} s, embed {self.embed_s:.1f} s, "
            f"total {self.wall_s:.1f} s; {self.tokens_per_s:.0f} tokens/s",
            f"wrote {self.out}",
        ]

    def _alias_lines(self) -> list[str]:
        """Spellings of one gene merged into its first spelling (none when there are none)."""
        if not self.aliases:
            return []
        pairs = [f"{alias} -> {key}" for alias, key in self.aliases.items()]
        return [f"same gene, other spelling: {len(pairs)} merged into the first spelling "
                f"({name_some(pairs)}); meta['aliases'] lists them"]

    def _incomplete_lines(self) -> list[str]:
        """The incomplete genes' line (none when every announced sequence came)."""
        if not self.incomplete:
            return []
        line = (f"incomplete: {len(self.incomplete)} genes ({len(self.missing_sequences)} "
                f"sequences missing): {name_some(self.incomplete)}; see "
                f"{unresolved_report_path(self.out).name}")
        if self.canonical_missing:
            line += (f"; canonical isoform missing, first row not canonical: "
                     f"{name_some(self.canonical_missing)}")
        return [line]

    def count(self, genes: Sequence[str], chosen: Mapping[str, GeneIsoforms],
              reused: EsmFile | None, stage: StageCounts) -> None:
        """Tally statuses (fresh records first, else what the reused file recorded)."""
        old = reused.meta if reused is not None else {}
        for query in genes:
            gene = chosen.get(query)
            status = gene.status if gene is not None else old.get("status", {}).get(query, "ok")
            if gene is None and reused is not None:
                self.reused_rows += len(reused.rows_of(query))
            self._tally(query, status)
            self._tally_missing(query, gene, old)
        self.distinct_sequences = len({i.sequence for g in chosen.values()
                                       for i in g.isoforms})
        self.embedded_now, self.tokens, self.embed_s = stage.embedded, stage.tokens, stage.busy_s
        self.cached_rows = stage.cached
        self.failed = sorted(name for name, _ in stage.failed.values())

    def _tally(self, query: str, status: str) -> None:
        if status == "ok":
            self.resolved += 1
        elif status == "incomplete":
            self.incomplete.append(query)
        elif status == "no_protein":
            self.no_protein.append(query)
        else:
            self.not_found.append(query)

    def _tally_missing(self, query: str, gene: GeneIsoforms | None,
                       old: Mapping[str, Any]) -> None:
        """Missing sequences of a fresh record, else those the reused file's meta lists."""
        if gene is not None:
            missing, canonical = list(gene.missing_protein_ids), gene.canonical_missing
        else:
            missing = list(_per_gene(old, "missing_protein_ids").get(query) or ())
            canonical = query in _per_gene(old, "canonical_missing")
        self.missing_sequences += missing
        if canonical:
            self.canonical_missing.append(query)

    def raise_if_incomplete(self) -> None:
        """--strict: incomplete genes are an Ensembl failure (exit 3). Called after the
        output is written, so the rows that did come are kept for the rerun."""
        if self.incomplete:
            raise EnsemblError(
                f"--strict: {len(self.incomplete)} genes incomplete, "
                f"{len(self.missing_sequences)} protein sequences missing; {self.out} "
                f"holds the rest (see {unresolved_report_path(self.out).name}); {RETRY}",
                queries=self.incomplete)


def _per_gene(meta: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """meta[key] as a query -> value dict ({} when absent or of another shape)."""
    value = meta.get(key)
    return value if isinstance(value, Mapping) else {}


def write_side_files(out: Path, chosen: Mapping[str, GeneIsoforms], summary: RunSummary,
                     failed: Mapping[str, tuple[str, str]], written: EsmFile, *,
                     species: str) -> None:
    """The not_found list, the unresolved report and the failures next to `out`."""
    write_list(summary.not_found_path, summary.not_found)
    status = written.meta.get("status", {})
    unresolved = [chosen.get(q) or _recorded(q, written.meta)
                  for q in written.genes if status.get(q, "ok") != "ok"]
    rows = {q: len(i) for q, i in written.gene_to_isoform_indices.items()}
    write_unresolved_report(unresolved_report_path(out), unresolved, species=species,
                            rows=rows, failed={name for name, _ in failed.values()})
    write_list(out.with_name(out.stem + ".failed.tsv"),
               sorted(f"{name}\t{error}" for name, error in failed.values()))


def _recorded(query: str, meta: Mapping[str, Any]) -> GeneIsoforms:
    """A gene reused from an earlier file, rebuilt from what its meta recorded."""
    missing = tuple(str(p) for p in _per_gene(meta, "missing_protein_ids").get(query) or ())
    recorded = _per_gene(meta, "status").get(query)
    status: GeneStatus = ("incomplete" if missing else
                          "no_protein" if recorded == "no_protein" else "not_found")
    canonical = _per_gene(meta, "canonical_missing").get(query)
    gene_id = _per_gene(meta, "gene_ids").get(query)
    symbol = _per_gene(meta, "symbols").get(query)
    return GeneIsoforms(query, gene_id if isinstance(gene_id, str) else None,
                        symbol if isinstance(symbol, str) else None, (),
                        status, missing, canonical if isinstance(canonical, str) else None)


def write_list(path: Path, lines: Iterable[str]) -> None:
    """One item per line, atomically; no items removes a stale file instead."""
    items = list(lines)
    if items:
        atomic_text(path, "\n".join(items) + "\n")
    else:
        path.unlink(missing_ok=True)
